/*
moe_layout.h: where every routed slot of an MoE layer goes, in plain C shared by the CPU trainer,
the GPU trainer (counts cross to the host once per MoE layer) and the MPI and NCCL transports.
Pure functions of the routing counts: every rank computes the same layout from the same all-gathered
(W, E) count matrix, so sends and receives always match, zero-row ones included.

With W processes, rank r owns experts [r*E/W, (r+1)*E/W). A slot s = i*K + j is token i's j-th
choice. Per MoE layer, in this order:
  moe_total_counts     slots the whole batch routed to each expert (for the load-balancing loss)
  moe_capacity         cap = ceil(capacity_factor * N * K / E), N the tokens of the whole batch
  moe_capacity_plan    each expert keeps its first cap slots in (source rank, slot) order
  moe_dispatch_layout  sender: the kept slots sorted stably by expert into send-buffer rows
  moe_groups_layout    sender: each expert's rows split by source (LSH groups, simulated ranks)
  moe_send_rows        rows to each rank: its experts' rows (or their LSH centroids)
  moe_receive_layout   receiver: rows arrive by source rank; their order regrouped by expert
MoERouting holds all of it for every MoE layer (host memory); MoEStats the counters an MoE layer
reports: dropped slots, all-to-all rows, LSH statistics.
*/
#ifndef MOE_LAYOUT_H
#define MOE_LAYOUT_H

#include <limits.h>
#include <math.h>
#include "utils.h"  // callocCheck
#include "lshmoe.h" // LSHStats

// the counters of the last forward and backward of a model's MoE layers, summed over layers
typedef struct {
    long long dropped_slots;  // of the whole batch (all ranks)
    // all-to-all rows this rank sent to / received from other ranks: [0] dispatch, [1] combine,
    // [2] combine's backward, [3] dispatch's backward (bytes = rows * C * 4)
    long long a2a_sent[4], a2a_recv[4];
    // rows crossing between the W*V sources (real or simulated ranks) per all-to-all (all four
    // carry as many): [0] uncompressed, [1] as sent (centroids with LSH)
    long long wire_rows[2];
    LSHStats lsh;             // LSH compression (lshmoe.h), forward and backward
} MoEStats;

// The integer side of routing, per MoE layer, on the host (the GPU trainer copies what its kernels
// need). A group is the rows one source sends to one expert: (expert e, source v) with V sources
// per process (V > 1 simulates V ranks in one process). S = N*K slots of this rank's batch.
#define NUM_ROUTING_TENSORS 15
typedef struct {
    int* expert_idx;     // (Lm, N, K) chosen experts, best first
    int* counts;         // (Lm, W, E) slots every rank routed to each expert, before capacity
    int* kept;           // (Lm, W, E) of those, the slots each expert keeps
    int* wire;           // (Lm, W, E) rows each rank sends each expert: kept, or centroids with LSH
    int* slot_row;       // (Lm, S) row of each slot in the send buffer, -1 if dropped
    int* row_slot;       // (Lm, S) slot of each send-buffer row
    int* send_offsets;   // (Lm, E+1) send rows of expert e: [send_offsets[e], send_offsets[e+1])
    int* recv_rows;      // (Lm, W) rows received from each rank
    int* recv_perm;      // (Lm, W*S) received row -> row grouped by local expert
    int* expert_offsets; // (Lm, E_local+1) rows of local expert e: [offsets[e], offsets[e+1])
    int* send_rows;      // (Lm, W) rows sent to each rank
    int* group_rows;     // (Lm, E*V+1) send rows of group g = e*V + v: [group_rows[g], group_rows[g+1])
    int* group_cents;    // (Lm, E*V+1) LSH: centroid rows of group g
    int* bucket_of_row;  // (Lm, S) LSH: bucket of each send row within its group
    int* bucket_size;    // (Lm, S) LSH: rows in each bucket, at the group's centroid offset
} MoERouting;

// one allocation for Lm layers of S slots (the largest batch) carved into the tensors; lsh: with
// the LSH ones. Returns the allocation.
static inline int* moe_routing_allocate(MoERouting* r, int Lm, size_t S, int W, int E, int E_local, int V, int lsh) {
    size_t G1 = (size_t)E * V + 1, LS = lsh ? Lm * S : 0, WE = (size_t)W * E;
    size_t sizes[NUM_ROUTING_TENSORS] = {Lm * S, Lm * WE, Lm * WE, Lm * WE, Lm * S, Lm * S, Lm * ((size_t)E + 1), (size_t)Lm * W,
                                         Lm * W * S, Lm * ((size_t)E_local + 1), (size_t)Lm * W, Lm * G1, Lm * G1, LS, LS};
    size_t total = 0;
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) { total += sizes[i]; }
    int* memory = (int*)callocCheck(total + 1, sizeof(int));
    int** ptrs[NUM_ROUTING_TENSORS] = {&r->expert_idx, &r->counts, &r->kept, &r->wire, &r->slot_row, &r->row_slot,
                                       &r->send_offsets, &r->recv_rows, &r->recv_perm, &r->expert_offsets, &r->send_rows,
                                       &r->group_rows, &r->group_cents, &r->bucket_of_row, &r->bucket_size};
    int* iter = memory;
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) { *(ptrs[i]) = iter; iter += sizes[i]; }
    return memory;
}

// the tensors of MoE layer m among r's, for a forward of S slots; WS: the rows one rank's experts
// can receive (W times the allocation's slots)
static inline MoERouting moe_routing_layer(MoERouting r, int m, size_t S, size_t WS, int W, int E, int E_local, int V, int lsh) {
    size_t G1 = (size_t)E * V + 1, WE = (size_t)W * E;
    r.expert_idx += m * S;
    r.counts += m * WE;
    r.kept += m * WE;
    r.wire += m * WE;
    r.slot_row += m * S;
    r.row_slot += m * S;
    r.send_offsets += (size_t)m * (E + 1);
    r.recv_rows += (size_t)m * W;
    r.recv_perm += m * WS;
    r.expert_offsets += (size_t)m * (E_local + 1);
    r.send_rows += (size_t)m * W;
    r.group_rows += m * G1;
    r.group_cents += m * G1;
    if (lsh) {
        r.bucket_of_row += m * S;
        r.bucket_size += m * S;
    }
    return r;
}

// whether LSH compression (lsh.L > 0; off: L = 0) with V sources per process of W fits a model
// of E experts (E <= 1: dense); 0, or -1 with err set
static inline int moe_lsh_check(int E, LSHConfig lsh, int V, int W, char* err, size_t errlen) {
    if (lsh.L > 0) {
        if (E <= 1) { snprintf(err, errlen, "LSH compresses the MoE all-to-all: it needs E > 1 experts (-E)"); return -1; }
        if (lsh_config_check(lsh.L, lsh.dp, err, errlen) != 0) { return -1; }
        if (lsh.center > 1 || lsh.center < 0 || lsh.compensate > 1 || lsh.compensate < 0) { snprintf(err, errlen, "LSH centring and compensation are 0 or 1"); return -1; }
    }
    if (V < 1 || (E > 1 && E % (V * W) != 0)) {
        snprintf(err, errlen, "%d simulated ranks x %d processes must divide E=%d", V, W, E);
        return -1;
    }
    return 0;
}

// total (E) = the slots all W ranks routed to each expert; returns total
static inline int* moe_total_counts(int* total, const int* counts, int W, int E) { // (E), (W,E)
    for (int e = 0; e < E; e++) {
        total[e] = 0;
        for (int q = 0; q < W; q++) { total[e] += counts[q * E + e]; }
    }
    return total;
}

// capacity per expert: ceil(capacity_factor * N * K / E) slots, N the tokens of the whole batch
// (all ranks); <= 0 means dropless
static inline int moe_capacity(float capacity_factor, long long N, int K, int E) {
    if (capacity_factor <= 0.0f) { return INT_MAX; }
    return (int)ceil((double)capacity_factor * N * K / E);
}

// counts (W,E): slots each rank routed to each expert (every rank knows all of them after an
// all-gather). An expert keeps its first cap slots in the order (source rank, slot), the order a
// single process with the whole batch would see. kept (W,E) receives the kept counts; returns the
// number of dropped slots.
static inline long long moe_capacity_plan(int* kept, const int* counts, int W, int E, int cap) { // (W,E), (W,E)
    long long dropped = 0;
    for (int e = 0; e < E; e++) {
        long long room = cap;
        for (int q = 0; q < W; q++) {
            int c = counts[q * E + e];
            int k = room <= 0 ? 0 : (c < room ? c : (int)room);
            kept[q * E + e] = k;
            room -= k;
            dropped += c - k;
        }
    }
    return dropped;
}

// Sender side: slots s = i*K + j (token i, j-th choice) sorted stably by expert, keeping the first
// kept[e] of each expert. Row r of the send buffer holds slot row_slot[r]; expert e's rows are
// [send_offsets[e], send_offsets[e+1]); slot_row[s] = -1 for a dropped slot.
static inline void moe_dispatch_layout(int* slot_row, int* row_slot, int* send_offsets, int* fill, // (S), (S), (E+1), (E) scratch
                                       const int* expert_idx, const int* kept, int S, int E) { // (S), (E)
    send_offsets[0] = 0;
    for (int e = 0; e < E; e++) { send_offsets[e + 1] = send_offsets[e] + kept[e]; fill[e] = 0; }
    for (int s = 0; s < S; s++) {
        int e = expert_idx[s];
        if (fill[e] < kept[e]) {
            int r = send_offsets[e] + fill[e]++;
            slot_row[s] = r;
            row_slot[r] = s;
        } else {
            slot_row[s] = -1;
        }
    }
}

// Groups: the send rows of expert e (in slot order, so in token order) split by source
// v = token * V / N (= token / (N/V): each of the V sources of this process owns whole
// sequences), into g = e*V + v. V > 1 simulates V ranks in one process. Returns the rows that
// cross between ranks: the owner of e among the W*V sources is e / (E/(W*V)), the source of group
// (e, v) is rank*V + v.
static inline long long moe_groups_layout(int* group_rows, // (E*V+1): rows of group g are [group_rows[g], group_rows[g+1])
                                          const int* send_offsets, const int* row_slot, // (E+1), (S)
                                          int N, int K, int E, int V, int rank, int W) {
    int per_owner = E / (W * V);
    long long crossing = 0;
    for (int e = 0; e < E; e++) {
        int r = send_offsets[e];
        for (int v = 0; v < V; v++) {
            group_rows[e * V + v] = r;
            while (r < send_offsets[e + 1] && (int)((long long)(row_slot[r] / K) * V / N) == v) { r++; }
            if (e / per_owner != rank * V + v) { crossing += r - group_rows[e * V + v]; }
        }
    }
    group_rows[E * V] = send_offsets[E];
    return crossing;
}

// send_rows (W): the rows this rank sends to each rank q, those of q's experts; wire (W,E) the
// rows each rank sends each expert (kept slots, or their LSH centroids)
static inline void moe_send_rows(int* send_rows, const int* wire, int rank, int W, int E) {
    int El = E / W;
    for (int q = 0; q < W; q++) {
        send_rows[q] = 0;
        for (int e = q * El; e < (q + 1) * El; e++) { send_rows[q] += wire[rank * E + e]; }
    }
}

// Receiver side: rows arrive by source rank, each source's rows by expert. recv_perm[i] is the
// position of received row i once regrouped by local expert (then source, then slot);
// expert_offsets over the regrouped rows; recv_rows[q] = rows from rank q. Returns the row count.
static inline int moe_receive_layout(int* recv_perm, int* expert_offsets, int* recv_rows, // (R), (E_local+1), (W)
                                     const int* kept, int W, int E, int e0, int E_local) { // (W,E)
    expert_offsets[0] = 0;
    for (int el = 0; el < E_local; el++) {
        int n = 0;
        for (int q = 0; q < W; q++) { n += kept[q * E + e0 + el]; }
        expert_offsets[el + 1] = expert_offsets[el] + n;
    }
    int i = 0;
    for (int q = 0; q < W; q++) {
        recv_rows[q] = 0;
        for (int el = 0; el < E_local; el++) {
            int before = 0; // rows of this expert from lower ranks
            for (int qq = 0; qq < q; qq++) { before += kept[qq * E + e0 + el]; }
            for (int k = 0; k < kept[q * E + e0 + el]; k++) { recv_perm[i++] = expert_offsets[el] + before + k; }
            recv_rows[q] += kept[q * E + e0 + el];
        }
    }
    return i;
}

// counts one all-to-all and its reverse (dispatch and combine, or their backwards: first = 0 or
// 2) in the rows this rank sent to and received from other ranks
static inline void moe_count_alltoalls(MoEStats* s, int first, const int* send_rows, const int* recv_rows, int rank, int W) {
    for (int q = 0; q < W; q++) {
        if (q == rank) { continue; }
        s->a2a_sent[first] += send_rows[q]; s->a2a_recv[first] += recv_rows[q];
        s->a2a_sent[first + 1] += recv_rows[q]; s->a2a_recv[first + 1] += send_rows[q];
    }
}

#endif // MOE_LAYOUT_H

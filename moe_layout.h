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
MoEStats holds the counters an MoE layer reports: dropped slots, all-to-all rows, LSH statistics.
*/
#ifndef MOE_LAYOUT_H
#define MOE_LAYOUT_H

#include <limits.h>
#include <math.h>
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

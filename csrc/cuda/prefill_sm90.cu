/*
 * prefill_sm90.cu - segment-masked attention over whole sequences on Hopper (sm_90a),
 * head dim 128: warpgroup MMA (wgmma) fed from 128-byte-swizzled shared memory.
 *
 * The grid is persistent (one block per SM). A block takes work items - 128 query rows
 * of one head of one sequence, or the few rows of a sequence's last tile for several heads
 * of one GQA group at once (heads_per_item) - one after another from a counter, and has
 * 12 warps:
 *
 *   warps 0-3   consumer warpgroup 0: query rows 0..63 of the item
 *   warps 4-7   consumer warpgroup 1: query rows 64..127
 *   warps 8-11  producer warpgroup: takes the items, plans each one's key tiles,
 *               publishes its header (rows, segment facts of its queries), copies its
 *               Q into one of two buffers, then K and V tiles of 128 keys into a
 *               two-stage ring with cp.async, writes the per-key segment facts of
 *               partial tiles, and signals everything through mbarriers
 *
 * The producer runs up to one item ahead: while the consumers finish an item, the next
 * one's plan, Q and first tiles are already on their way. It hands registers to the
 * consumers (setmaxnreg: 88 / 200 per thread). The tile plan is the one of prefill.cu
 * (plan.cuh): before touching K/V the producer classifies every key tile at or before the
 * item's last query from the segment table (classify_rect); empty tiles never enter the
 * plan, full tiles run without mask arithmetic, partial tiles evaluate the mask and bias
 * in registers (those masked only by causality, such as the diagonal tile of an item whose
 * rows lie in one segment, compare positions and read no per-key facts). An item with no
 * global row and no shared segment before its rows skips the classification: its plan is
 * a range of tiles (SimplePlan), which takes the plan off the producer's path between two
 * items. Tiles are processed from the diagonal down.
 * S = Q K^T is wgmma with both operands in shared memory; O += P V is wgmma with P in
 * registers (the S accumulator converted in place) and V in shared memory read N-major
 * (the transpose bit). Softmax is online, fp32, base 2. Each warpgroup issues Q K^T of
 * tile n + 1 and P V of tile n as one batch; the two warpgroups take turns issuing their
 * batches (named barriers), so one warpgroup's softmax runs while the tensor cores work on
 * the other's products. (The assembler places the wait for P V at the top of the softmax,
 * since that wait names no register. A build that pinned it below the softmax, so that
 * the softmax also overlapped the warpgroup's own P V, measured 3-5% slower on an H100.)
 * K and V of a stage are released separately (K once its scores are
 * in, V once P V is done), so the producer refills K half a step earlier.
 *
 * Why cp.async and not TMA: a tensor map needs the extent of the key axis, and
 * the contract only gives per-sequence lengths in device memory; the rows past a
 * sequence's end must read as zeros (a padded batch may hold NaN there), which
 * cp.async's zero fill gives row by row. Whole tiles can still come through the copy
 * engine, with maps over the whole buffer built by the host and only a sequence's last
 * tile by cp.async, as the decode kernel does (decode_tma.cuh). That was built and timed
 * on an H100 (two 64-column boxes per tile, issued by one producer thread, completing on
 * the stage's full barrier by byte count): 16x2048+16 took 1120 / 1119 us against 1111 /
 * 1119 us with the same build loading by cp.async, and 5x400+16 lost 2 us to the larger
 * producer (it spilled at 56 registers). The consumers' softmax, not the loads, sets the
 * pace, so the loads stay on cp.async.
 *
 * Conventions of the PTX instructions used (PTX ISA, "Asynchronous Warpgroup
 * Level Matrix Multiply-Accumulate"):
 *
 *  - wgmma.mma_async m64nNk16, f32 accumulators. Warp w (0..3) of the warpgroup
 *    owns rows 16w..16w+15 of the 64-row result; lane l has g = l/4, c = l%4.
 *    Accumulator register 4i+x (i = n8 block, x = 0..3) holds row 16w + g + 8*(x/2),
 *    column 8i + 2c + (x%2) - the mma.sync m16n8 C layout repeated along N.
 *  - A from registers (bf16/f16, k16): 4 32-bit registers per thread, the mma.sync
 *    m16n8k16 A layout of the warp's 16 rows: r0 = (row g, k 2c..2c+1),
 *    r1 = (row g+8, k 2c..), r2 = (row g, k 8+2c..), r3 = (row g+8, k 8+2c..).
 *    So the S accumulator blocks 2t and 2t+1 (keys 16t..16t+15) pack into the A
 *    fragment of k-step t directly.
 *  - Matrix descriptors (64 bit): bits 0-13 start address >> 4, 16-29 leading
 *    dimension byte offset (LBO) >> 4, 32-45 stride dimension byte offset (SBO) >> 4,
 *    49-51 base offset (0: every swizzle pattern starts 1024-byte aligned), 62-63
 *    swizzle mode (1 = 128-byte swizzle).
 *  - 128-byte swizzle: a "row" is 128 bytes (64 16-bit elements) of the contiguous
 *    dimension; 8 rows form a 1024-byte atom; the 16-byte chunk c of row r is stored
 *    at chunk c ^ (r % 8). The hardware applies it as address bits [4:6] ^= [7:9],
 *    so it holds for any atom aligned to 1024 bytes.
 *  - K-major operand (Q as A, K as B of S = Q K^T; the 16-wide k slice lies inside
 *    one 128-byte row): SBO = 1024 (next 8 rows of M/N), LBO unused for swizzled
 *    K-major layouts (encoded 1). The k-step kk of a 64-element row half starts
 *    32*kk bytes further (the hardware swizzles the computed address).
 *  - N-major operand (V as B of O = P V, imm-trans-b = 1): the atom is 8 key rows
 *    x 64 d values. SBO is the step between 8-key groups (1024) and LBO between
 *    64-wide groups of N (HALF_T: the two d halves of a V tile), so one N = 128
 *    instruction covers all of d. (With the two fields swapped the oracle tests
 *    fail. Two N = 64 instructions per 16 keys, one per d half, measured 1% slower
 *    at 16x2048+16 on an H100.)
 *  - K and V tiles share one storage: [d half (2)][key (128)][128 bytes], swizzled
 *    by key row. Q the same with query rows.
 */
#include "common.cuh"
#include "plan.cuh"
#include "prefill.cuh"

namespace sfcuda {
namespace {

constexpr int D = 128;               /* head dim */
constexpr int BM = SM90_BM;          /* query rows per block */
constexpr int BN = 128;              /* keys per tile */
constexpr int CONSUMERS = 256;       /* warpgroups 0 and 1 */
constexpr int PRODUCERS = 128;       /* warpgroup 2 */
constexpr int THREADS = CONSUMERS + PRODUCERS;
/* Registers per thread after the split (setmaxnreg). The block starts at 65536 / 384
 * = 168 (rounded down to 8) for everyone; the producer gives back down to 88, which
 * frees 80 x 128 registers, more than the 32 x 256 the consumers take to reach 200.
 * (A 56 / 224 split left the producer spilling on its path from one item to the next,
 * which the consumers wait on: 16x2048+16 took 2.5% longer on an H100.) */
constexpr int PRODUCER_REGS = 88;
constexpr int CONSUMER_REGS = 200;
constexpr int PLAN_CAP = 512;        /* key tiles classified per planning round */
constexpr int SEG_CAP = 1024;        /* segment tables up to this size are staged in smem */

/* shared memory (offsets from a 1024-aligned base) */
constexpr int HALF_Q = BM * 128;                /* one 64-column half of Q */
constexpr int HALF_T = BN * 128;                /* one 64-column half of a K or V tile */
constexpr int QBUF = 2 * HALF_Q;                /* Q of one item (two buffers) */
constexpr int OFF_Q = 0;
constexpr int OFF_KV = OFF_Q + 2 * QBUF;        /* stage s: K at +s*STAGE, V at +HALF_T*2 */
constexpr int STAGE = 4 * HALF_T;
constexpr int OFF_PLAN = OFF_KV + 2 * STAGE;
constexpr int OFF_END = OFF_PLAN + PLAN_CAP * 4;
constexpr int OFF_BIAS = OFF_END + SEG_CAP * 4;
constexpr int OFF_KIND = OFF_BIAS + SEG_CAP * 4;
/* Per-key mask facts of the K tile of step n live in slot n % 3: consumers read them
 * after freeing the step's K, while the producer may already fill step n + 2. */
constexpr int FACT_SLOTS = 3;
constexpr int OFF_FACTS = OFF_KIND + SEG_CAP;   /* [slot][seg BN | bias BN] */
/* (item headers, step entries, barriers and counters follow; see below) */
static_assert(OFF_KV % 1024 == 0 && STAGE % 1024 == 0 && HALF_T % 1024 == 0 && QBUF % 1024 == 0,
              "swizzle atoms must start 1024-byte aligned");

/* ------------------------------------------------------------ PTX wrappers
 * (the mbarrier ones are in common.cuh) */

/* Orders generic-proxy shared-memory writes that this thread has observed (its own, or
 * cp.async results whose completion it saw through an mbarrier) before its later
 * async-proxy reads (wgmma operands). */
__device__ __forceinline__ void fence_proxy_async()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/* An arrival on the mbarrier once every cp.async this thread has issued so far has landed
 * (.noinc: the barrier's count includes these arrivals). The thread goes on at once. */
__device__ __forceinline__ void cp_async_arrive(uint32_t bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/* Keeps the compiler from moving reads or writes of accumulator registers across a
 * wgmma issue or wait (the asm "uses and redefines" each register). */
template <int N> __device__ __forceinline__ void fence_regs(float *r)
{
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(uint32_t *r)
{
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

/*
 * Descriptors with 128-byte swizzle, built as two 32-bit words: lo = start address >> 4
 * and LBO, hi = SBO and the swizzle mode. Within one operand buffer only the start address
 * moves, and its 14-bit field never carries into LBO (shared memory addresses are below
 * 2^18), so the descriptor of a slice is one 32-bit add to lo. (Built per slice with shifts
 * and masks, the 24 descriptors of a tile cost ~160 instructions per warp.)
 */
__device__ __forceinline__ uint32_t desc_lo(uint32_t saddr, uint32_t lbo16)
{
    return ((saddr & 0x3FFFFu) >> 4) | ((lbo16 & 0x3FFFu) << 16);
}
__host__ __device__ constexpr uint32_t desc_hi(uint32_t sbo16) { return (sbo16 & 0x3FFFu) | (1u << 30); }
/* lo of the slice `bytes` further (a multiple of 16) */
__device__ __forceinline__ uint64_t desc(uint32_t lo, uint32_t hi, uint32_t bytes)
{
    return ((uint64_t)hi << 32) | (uint64_t)(lo + (bytes >> 4));
}

#define SF_ACC8(a, i)                                                                          \
    "+f"(a[i]), "+f"(a[i + 1]), "+f"(a[i + 2]), "+f"(a[i + 3]), "+f"(a[i + 4]), "+f"(a[i + 5]), \
        "+f"(a[i + 6]), "+f"(a[i + 7])
#define SF_ACC32(a) SF_ACC8(a, 0), SF_ACC8(a, 8), SF_ACC8(a, 16), SF_ACC8(a, 24)
#define SF_ACC64(a) SF_ACC32(a), SF_ACC8(a, 32), SF_ACC8(a, 40), SF_ACC8(a, 48), SF_ACC8(a, 56)

#define SF_D64                                                                                  \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,"  \
    "%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45," \
    "%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"

/*
 * qk: S (64 x 128 keys) (+)= A(64 x 16 d, smem, K-major) * B(128 keys x 16 d, smem,
 *     K-major)^T. Operands after the descriptors: scale-d (predicate; false on the
 *     first k-step: d = A*B), imm-scale-a = 1, imm-scale-b = 1, imm-trans-a = 0,
 *     imm-trans-b = 0 (both K-major).
 * pv: O (64 x 128 d) += P(64 x 16 keys, registers) * V(16 keys x 128 d, smem,
 *     N-major). Operands after the descriptor: scale-d = 1 (accumulate; the SASS shows
 *     the accumulator as input), imm-scale-a = 1, imm-scale-b = 1, imm-trans-b = 1.
 */
template <typename T> struct WgmmaOps;

/* The two specialisations differ only in the element type named in the instruction. */
#define SF_WGMMA_OPS(CTYPE, PTXTYPE)                                                             \
    template <> struct WgmmaOps<CTYPE> {                                                         \
        static __device__ __forceinline__ void qk(float *d, uint64_t da, uint64_t db,            \
                                                  int accumulate)                                \
        {                                                                                        \
            asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"                          \
                         " wgmma.mma_async.sync.aligned.m64n128k16.f32." PTXTYPE "." PTXTYPE     \
                         " " SF_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"                            \
                         : SF_ACC64(d)                                                           \
                         : "l"(da), "l"(db), "r"(accumulate));                                   \
        }                                                                                        \
        static __device__ __forceinline__ void pv(float *d, const uint32_t *a, uint64_t db)      \
        {                                                                                        \
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." PTXTYPE "." PTXTYPE      \
                         " " SF_D64 ", {%64,%65,%66,%67}, %68, 1, 1, 1, 1;\n"                    \
                         : SF_ACC64(d)                                                           \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));                 \
        }                                                                                        \
    };
SF_WGMMA_OPS(__nv_bfloat16, "bf16")
SF_WGMMA_OPS(__half, "f16")
#undef SF_WGMMA_OPS

/*
 * The producer's copy of ROWS rows (global rows base + r*stride, r < valid_rows;
 * later rows become zeros) into the swizzled [2 halves][ROWS][128 B] layout. Thread t
 * (0..127) takes 16-byte chunk t%16 of rows t/16 + 8i: 16 threads read a whole
 * 256-byte row, and since r % 8 == t/16 for all its rows, the swizzled column of a
 * thread is fixed (chunk c of row r sits at chunk (c%8) ^ (r%8) of its half).
 */
template <int ROWS>
__device__ __forceinline__ void load_rows_sw128(uint32_t s_tile, const uint16_t *base,
                                                int64_t stride, int valid_rows, int t)
{
    const int row0 = t >> 4, chunk = t & 15;
    const uint16_t *src = base + row0 * stride + chunk * 8;
    const int64_t step = 8 * stride;
    const uint32_t dst = s_tile + (chunk >> 3) * (ROWS * 128) + row0 * 128 +
                         (((chunk & 7) ^ row0) << 4);
#pragma unroll
    for (int i = 0; i < ROWS / 8; ++i) {
        const bool ok = row0 + 8 * i < valid_rows;
        cp_async16(dst + i * 1024, ok ? src : base, ok);
        src += step;
    }
}

/* The same copy for an item that packs heads: row r is row r % rph of the r / rph-th head
 * from base (head_stride apart); rows from valid_rows on become zeros. */
template <int ROWS>
__device__ __forceinline__ void load_packed_rows_sw128(uint32_t s_tile, const uint16_t *base,
                                                       int64_t head_stride, int64_t stride,
                                                       int rph, int valid_rows, int t)
{
    const int row0 = t >> 4, chunk = t & 15;
    const uint32_t dst = s_tile + (chunk >> 3) * (ROWS * 128) + row0 * 128 +
                         (((chunk & 7) ^ row0) << 4);
#pragma unroll
    for (int i = 0; i < ROWS / 8; ++i) {
        const int r = row0 + 8 * i;
        const bool ok = r < valid_rows;
        const uint16_t *src = base + (r / rph) * head_stride + (r % rph) * stride + chunk * 8;
        cp_async16(dst + i * 1024, ok ? src : base, ok);
    }
}

/*
 * How many query heads one item takes when its tile has `rows` valid rows: the largest
 * divisor of the GQA group whose heads' rows fit one tile together (1 for tiles of more
 * than BM / 2 rows). The rows of those heads see the same keys (they sit at the same
 * positions and share the KV head), so one pass over the key tiles serves all of them.
 * This is for a sequence's last tile: the 16 rows of a global tail see every key, and
 * unpacked they cost a whole pass over the sequence per query head on one warpgroup of
 * 64 rows, 48 of them padding. At 24 / 8 heads three heads' tails share one pass.
 */
__device__ __forceinline__ int heads_per_item(int group, int rows)
{
    for (int nh = min(group, BM / rows); nh > 1; --nh)
        if (group % nh == 0) return nh;
    return 1;
}

/* ------------------------------------------------------------ the work items */

/*
 * The grid is persistent: one block per SM, each taking work items - a tile of BM query
 * rows of one head of one sequence - from a counter until none is left, in the order of a
 * one-block-per-tile grid (x: head, y: tile from the end, z: sequence), so the tiles with
 * the most keys go first. (An item that packs nh heads is taken by its first head; the
 * others' counter values are skipped.) While the consumers finish one item (its last
 * products and the output), the producer already plans the next, loads its Q into the
 * other Q buffer and streams its first tiles: the start and the end of an item no longer
 * leave the tensor cores idle.
 *
 * Each launch takes a pair of counters (items handed out, blocks done) from a pool; the
 * last block to finish sets its pair back to zero, so every launch, and every replay of a
 * captured graph, finds it at zero. Launches in flight at the same time take different
 * pairs.
 */
constexpr int SCHED_POOL = 1024;
__device__ int g_sched[2 * SCHED_POOL];

/* What the producer tells the consumers about an item (double-buffered by item parity). */
struct ItemHeader {
    int item; /* -1: no more work */
    int b, h, i0, q_start, p0;
    int q_rows;       /* valid rows: row r < q_rows is row i0 + r % rph of head h + r / rph */
    int rph;          /* rows per head: BM, or the tile's rows when heads are packed */
    int32_t rows[BM]; /* per query row: its segment, | ROW_GLOBAL when that is global */
};
constexpr int32_t ROW_GLOBAL = 1 << 30;

/* A step's plan entry (FULL_BIT and the tile, plan.cuh), or the closing step of a planning
 * round (no K; P V of the round's last tile), which may close the item too. */
constexpr uint32_t CLOSE_BIT = 0x40000000u;
constexpr uint32_t LAST_BIT = 0x20000000u;
/* A partial tile whose only mask is causality (key <= query): every row sees every earlier
 * key of it, with no bias. Its mask needs no per-key facts. */
constexpr uint32_t CAUSAL_BIT = 0x10000000u;
constexpr uint32_t TILE_BITS = 0x0FFFFFFFu; /* the tile index of an entry */

constexpr int OFF_HDR = OFF_FACTS + FACT_SLOTS * 2 * BN * 4;
constexpr int OFF_ENTRY = OFF_HDR + 2 * (int)sizeof(ItemHeader);
constexpr int OFF_BAR = OFF_ENTRY + 2 * 4;
/* barrier kinds, two of each (by stage, Q buffer or header slot) */
enum { FULL_K, FULL_V, EMPTY_K, EMPTY_V, Q_FULL, Q_EMPTY, HDR_FULL, HDR_EMPTY, NBARS };
constexpr int OFF_COUNT = OFF_BAR + 2 * NBARS * 8; /* plan counts (4), taken items (2) */
constexpr int SMEM_USED = OFF_COUNT + 8 * 4;
constexpr int SMEM_BYTES = SMEM_USED + 1024;     /* slack to align the base to 1024 */
static_assert(OFF_BAR % 8 == 0, "mbarriers are 8-byte objects");
static_assert(SMEM_BYTES <= 227 * 1024, "fits the shared memory of an SM");

constexpr int PRODUCER_BAR = 3; /* named barrier of the producer warpgroup (1, 2: turns) */

/* The block's shared memory, from its 1024-aligned base. */
struct Smem {
    uint32_t base; /* shared-space address */
    uint8_t *p;    /* the same, generic */
    __device__ __forceinline__ uint32_t q(int qs) const { return base + OFF_Q + qs * QBUF; }
    __device__ __forceinline__ uint32_t kv(int st) const { return base + OFF_KV + st * STAGE; }
    __device__ __forceinline__ uint32_t bar(int kind, int i) const
    {
        return base + OFF_BAR + (2 * kind + i) * 8;
    }
    __device__ __forceinline__ ItemHeader &hdr(int hs) const
    {
        return reinterpret_cast<ItemHeader *>(p + OFF_HDR)[hs];
    }
    __device__ __forceinline__ uint32_t *entry() const { return reinterpret_cast<uint32_t *>(p + OFF_ENTRY); }
    __device__ __forceinline__ int32_t *facts(int n) const
    {
        return reinterpret_cast<int32_t *>(p + OFF_FACTS) + (n % FACT_SLOTS) * 2 * BN;
    }
    __device__ __forceinline__ int32_t *count() const { return reinterpret_cast<int32_t *>(p + OFF_COUNT); }
};

__device__ __forceinline__ void producer_sync()
{
    asm volatile("bar.sync %0, %1;\n" ::"n"(PRODUCER_BAR), "n"(PRODUCERS) : "memory");
}

/* Whether x holds in any thread of the producer warpgroup (a barrier of it). */
__device__ __forceinline__ bool producer_any(bool x)
{
    uint32_t r;
    asm volatile("{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n"
                 " barrier.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}\n"
                 : "=r"(r)
                 : "r"((uint32_t)x), "n"(PRODUCER_BAR), "n"(PRODUCERS)
                 : "memory");
    return r != 0;
}

/*
 * The plan of a work item whose rows are none of them global, with no shared segment
 * before the first row's segment sg0. Such rows see a key iff it precedes them and lies in
 * their own segment or a shared one, so every key from sg0's start to the last row is seen
 * by some row (a key of sg0 by the first row, a later one by the row at its own position)
 * and nothing before sg0's start is: the plan is every tile from the one holding sg0's
 * start to the diagonal, none of them empty. As classify_rect decides, a tile is full when
 * all its keys lie in sg0 before the first row and every row sees sg0 (one segment for all
 * rows, or sg0 shared); as plan_round requires, only within kv_len. No row is global, so no
 * bias applies. Those full tiles form one range, [full_lo, full_hi].
 */
struct SimplePlan {
    int jlo, full_lo, full_hi; /* tiles jlo .. the diagonal; full ones */
    bool one_segment;          /* every row lies in sg0 */
    __device__ __forceinline__ uint32_t entry(int j) const
    {
        if (j >= full_lo && j <= full_hi) return plan_entry(j, SF_BLOCK_FULL);
        /* past the full range, with all rows in sg0 and the tile inside it, only
         * causality masks (the diagonal tiles) */
        return plan_entry(j, SF_BLOCK_PARTIAL) | (one_segment && j >= full_lo ? CAUSAL_BIT : 0u);
    }
};
template <int BN>
__device__ __forceinline__ SimplePlan simple_plan(const SegView &view, const BlockRows &br, int sg0,
                                                  int sg1)
{
    const int k_lo = sg0 > 0 ? view.end_of(sg0 - 1) : 0;
    const bool one = sg0 == sg1 || view.kind_of(sg0) == SF_SHARED;
    return SimplePlan{k_lo / BN, (k_lo + BN - 1) / BN, one ? min(br.p0 + 1, br.kv_len) / BN - 1 : -1,
                      sg0 == sg1};
}

/* ------------------------------------------------------------ the producer */

/* An item the producer has taken: the values that describe it (the rest follows from them,
 * finish_rows). Passed this way from the take to the item's steps, the producer's per-step
 * state fits its registers (spills fell from 56 / 72 bytes to 20 / 24 for the kernel). */
struct TakenItem {
    int h, b, i0, q_len, kv_len, q_start, k_start;
};
__device__ __forceinline__ BlockRows rows_of(const PrefillArgs &a, const TakenItem &it)
{
    BlockRows r;
    r.h = it.h;
    r.b = it.b;
    r.i0 = it.i0;
    r.q_len = it.q_len;
    r.kv_len = it.kv_len;
    r.q_start = it.q_start;
    r.k_start = it.k_start;
    finish_rows<BM, BN>(a, r);
    return r;
}

/*
 * Warpgroup 2 (thread pt = 0..127): takes items, publishes each one's header, copies its Q
 * and streams its K and V tiles through the two stages. Step n of the block (all items)
 * uses stage n & 1: K of one plan tile and V of the one before (the plan runs from the
 * diagonal down), or, closing a planning round, only V of its last tile.
 *
 * An item is taken (its counter value, then its lengths) after the last step of the item
 * before is issued. (Taken earlier, once that item's second step was out, so that the two
 * trips to memory left the path between items, it measured 2-4% slower at 16x2048+16 and
 * 20% at 5x400+16 on an H100, with or without its Q copied that early.)
 */
__device__ __forceinline__ void produce(const PrefillArgs &a, const Smem &sm, int n_items,
                                        int tiles, int heads, int *sched, int pt)
{
    uint32_t *s_plan = reinterpret_cast<uint32_t *>(sm.p + OFF_PLAN);
    int32_t *s_end = reinterpret_cast<int32_t *>(sm.p + OFF_END);
    float *s_bias = reinterpret_cast<float *>(sm.p + OFF_BIAS);
    uint8_t *s_kind = sm.p + OFF_KIND;
    int32_t *s_taken = sm.count() + 4;
    uint32_t *s_entry = sm.entry();

    /* The next item with rows (counter values past a short sequence's end, and those of
     * heads packed into another item, are skipped); false when none is left. */
    int taken = 0; /* counter values taken: s_taken slot taken & 1 */
    auto take = [&](TakenItem &it) -> bool {
        for (;; ++taken) {
            if (pt == 0) s_taken[taken & 1] = atomicAdd(sched, 1);
            producer_sync();
            const int item = s_taken[taken & 1]; /* rewritten two takes on, after another barrier */
            if (item >= n_items) return false;
            const int h = item % heads, t = (item / heads) % tiles, b = item / (heads * tiles);
            BlockRows br;
            if (!rows_at<BM, BN>(a, h, b, t, tiles, br)) continue; /* past a short sequence's end */
            if (h % heads_per_item(a.group, min(BM, br.q_len - br.i0)) != 0)
                continue; /* packed into the item of head h - h % nh */
            it = TakenItem{h, b, br.i0, br.q_len, br.kv_len, br.q_start, br.k_start};
            ++taken;
            return true;
        }
    };
    /* Q of item k (rows per head, nh heads) into buffer k & 1, once the consumers of item
     * k - 2 are done with it */
    auto issue_q = [&](const TakenItem &it, int k, int rows, int nh) {
        const int qs = k & 1, qu = k >> 1;
        if (qu > 0) mbar_wait(sm.bar(Q_EMPTY, qs), (qu - 1) & 1);
        const uint16_t *qbase = a.q + it.b * a.q_sb + it.h * a.q_sh + (int64_t)(it.q_start + it.i0) * a.q_st;
        if (nh > 1) load_packed_rows_sw128<BM>(sm.q(qs), qbase, a.q_sh, a.q_st, rows, nh * rows, pt);
        else load_rows_sw128<BM>(sm.q(qs), qbase, a.q_st, rows, pt); /* past q_len: zeros */
        cp_async_arrive(sm.bar(Q_FULL, qs));
    };

    int n = 0;         /* steps issued */
    int staged = -1;   /* the sequence whose segment table is staged */
    SegView view{};
    TakenItem cur;
    bool have = take(cur);
    int k = 0; /* items handed to the consumers: header slot and Q buffer k & 1 */
    for (; have; ++k) {
        const BlockRows br = rows_of(a, cur);
        const int rows = min(BM, br.q_len - br.i0), nh = heads_per_item(a.group, rows);
        issue_q(cur, k, rows, nh); /* first: the consumers wait for it before anything else */
        const int hs = k & 1, hu = k >> 1;
        ItemHeader &hd = sm.hdr(hs);
        if (hu > 0) mbar_wait(sm.bar(HDR_EMPTY, hs), (hu - 1) & 1);
        if (br.b != staged) { /* a new sequence: its table into shared memory */
            if (staged >= 0) producer_sync(); /* everyone is done with the old one */
            view = make_view(a.seg_ptr, a.seg_end, a.seg_kind, a.seg_bias, br.b);
            stage_table<PRODUCERS>(view, SEG_CAP, s_end, s_kind, s_bias, pt);
            producer_sync();
            staged = br.b;
        }
        if (pt == 0) {
            hd.item = k;
            hd.b = br.b;
            hd.h = br.h;
            hd.i0 = br.i0;
            hd.q_start = br.q_start;
            hd.p0 = br.p0;
            hd.q_rows = nh * rows;
            hd.rph = nh > 1 ? rows : BM;
        }
        const int sg = view.seg(br.p0 + (nh > 1 ? pt % rows : pt));
        const bool row_global = view.kind_of(sg) == SF_GLOBAL;
        hd.rows[pt] = sg | (row_global ? ROW_GLOBAL : 0);
        mbar_arrive(sm.bar(HDR_FULL, hs));
        /* Whether the item's tiles need classifying: they do when a row is global or a
         * shared segment lies before the first row's; otherwise the plan is a range of
         * tiles (SimplePlan). */
        const int sg0 = view.seg(br.p0), sg1 = view.seg(br.p1);
        bool classify = br.p0 + pt <= br.p1 && row_global;
        for (int s = pt; s < sg0 && !classify; s += PRODUCERS) classify = view.kind_of(s) == SF_SHARED;
        classify = producer_any(classify);

        const int kv_len = br.kv_len;
        const uint16_t *kbase = a.k + br.b * a.k_sb + br.hk * a.k_sh + (int64_t)br.k_start * a.k_st;
        const uint16_t *vbase = a.v + br.b * a.v_sb + br.hk * a.v_sh + (int64_t)br.k_start * a.v_st;
        /* The copies of one step: K, then V (none when the tile index is negative). Each
         * half of the stage first waits until the consumers are done with it (from its
         * second use on); its full barrier gets this thread's arrival when the copies
         * have landed, so the producer never waits for its own loads. */
        auto issue_step = [&](int jk, int jv, int st, int use) {
            const uint32_t sk = sm.kv(st), sv = sk + 2 * HALF_T;
            if (use > 0) mbar_wait(sm.bar(EMPTY_K, st), (use - 1) & 1);
            if (jk >= 0)
                load_rows_sw128<BN>(sk, kbase + (int64_t)jk * BN * a.k_st, a.k_st, kv_len - jk * BN, pt);
            cp_async_arrive(sm.bar(FULL_K, st));
            if (use > 0) mbar_wait(sm.bar(EMPTY_V, st), (use - 1) & 1);
            if (jv >= 0)
                load_rows_sw128<BN>(sv, vbase + (int64_t)jv * BN * a.v_st, a.v_st, kv_len - jv * BN, pt);
            cp_async_arrive(sm.bar(FULL_V, st));
        };

        /* the diagonal tile's K, before the plan is known */
        issue_step(br.jlast, -1, n & 1, n >> 1);

        const SimplePlan sp = classify ? SimplePlan{0, 0, -1, false} : simple_plan<BN>(view, br, sg0, sg1);

        bool first = true;
        TakenItem nxt;
        for (int jtop = br.jlast + 1; jtop > sp.jlo; jtop -= PLAN_CAP) {
            /* a planning round: the non-empty tiles of [jbase, jtop), ascending, in s_plan */
            const int jbase = max(sp.jlo, jtop - PLAN_CAP);
            int nplan = jtop - jbase;
            if (classify) {
                nplan = plan_round<BN, PRODUCERS, PRODUCER_BAR>(view, br.p0, br.p1, kv_len, jbase,
                                                                nplan, s_plan, sm.count(), pt);
            } else {
                producer_sync(); /* every thread is done reading the last round's s_plan */
                for (int c = pt; c < nplan; c += PRODUCERS) s_plan[c] = sp.entry(jbase + c);
                producer_sync();
            }
            const uint32_t close = CLOSE_BIT | (jbase == sp.jlo ? LAST_BIT : 0u);
            for (int i = 0; i <= nplan; ++i, ++n) {
                const int st = n & 1, use = n >> 1;
                const uint32_t ek = i < nplan ? s_plan[nplan - 1 - i] : close;
                const int jk = i < nplan ? (int)(ek & TILE_BITS) : -1;
                const int jv = i > 0 ? (int)(s_plan[nplan - i] & TILE_BITS) : -1;
                if (!first) issue_step(jk, jv, st, use); /* the first was issued above */
                if (jk >= 0 && !(ek & (FULL_BIT | CAUSAL_BIT))) { /* per-key facts for the mask */
                    int32_t *fseg = sm.facts(n);
                    key_facts(view, jk * BN + pt, &fseg[pt], reinterpret_cast<float *>(fseg + BN) + pt);
                }
                if (pt == 0) s_entry[st] = ek;
                first = false;
                mbar_arrive(sm.bar(FULL_K, st)); /* the facts and the entry (release) */
            }
        }
        have = take(nxt);
        cur = nxt;
    }
    /* no more work: tell the consumers, then retire */
    {
        const int hs = k & 1, hu = k >> 1;
        if (hu > 0) mbar_wait(sm.bar(HDR_EMPTY, hs), (hu - 1) & 1);
        if (pt == 0) sm.hdr(hs).item = -1;
        mbar_arrive(sm.bar(HDR_FULL, hs));
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory"); /* no copy outlives its thread */
    /* Every block takes items until one past the end; the last to do so resets the pair. */
    if (pt == 0 && atomicAdd(sched + 1, 1) == (int)gridDim.x - 1) {
        sched[0] = 0;
        sched[1] = 0;
    }
}

/* ------------------------------------------------------------ the consumers */

template <bool B> struct Flag {
    static constexpr bool value = B;
};

template <typename T>
__device__ __forceinline__ void consume(const PrefillArgs &a, const Smem &sm, int tid)
{
    const int warp = tid >> 5, lane = tid & 31;
    /* warpgroup (through a shuffle, so that the compiler knows it is warp-uniform and
     * keeps the descriptors built from it in uniform registers), warp in it */
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0), wq = warp & 3;
    const int g = lane >> 2, c4 = lane & 3;
    const int row_of[2] = {wg * 64 + wq * 16 + g, wg * 64 + wq * 16 + g + 8}; /* in the tile */
    const uint32_t *s_entry = sm.entry();

    float o[64]; /* O (64 rows x 128 d of this warpgroup) in the accumulator layout */
    float s[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] = 0.f;
    uint32_t pa[BN / 16][4]; /* P of the tile whose P V is still to be issued */
#pragma unroll
    for (int t = 0; t < BN / 16; ++t) pa[t][0] = pa[t][1] = pa[t][2] = pa[t][3] = 0u;

    /* operand descriptors (low words) of K / V of stage 0 (stage st is st * STAGE bytes
     * further). K-major operands: LBO unused (1), SBO 1024. V (N-major): LBO HALF_T, the
     * step from one 64-wide d half to the other; SBO 1024, the step between 8-key groups. */
    constexpr uint32_t HI_KMAJOR = desc_hi(1024 >> 4), HI_V = desc_hi(1024 >> 4);
    const uint32_t lo_k0 = desc_lo(sm.kv(0), 1);
    const uint32_t lo_v0 = desc_lo(sm.kv(0) + 2 * HALF_T, HALF_T >> 4);
    uint32_t lo_q = 0; /* this warpgroup's rows of the item's Q buffer */

    /* S = Q K^T of the K in stage st: 8 k-steps of 16 over d; k-step kk lies in half
     * kk/4, at byte 32*(kk%4) of the 128-byte rows */
    auto issue_qk = [&](int st) {
        const uint32_t lo_k = lo_k0 + st * (STAGE >> 4);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            WgmmaOps<T>::qk(s, desc(lo_q, HI_KMAJOR, (kk >> 2) * HALF_Q + (kk & 3) * 32),
                            desc(lo_k, HI_KMAJOR, (kk >> 2) * HALF_T + (kk & 3) * 32), kk > 0);
    };
    /* keeps the compiler from moving accesses of P V's registers across its issue or wait */
    auto fence_pv_operands = [&] {
        fence_regs<64>(o);
        fence_regs<BN / 4>(&pa[0][0]);
    };
    /* O += P V for the P held in pa, V of stage st */
    auto issue_pv = [&](int st) {
        const uint32_t lo_v = lo_v0 + st * (STAGE >> 4);
#pragma unroll
        for (int t = 0; t < BN / 16; ++t) /* keys 16t..16t+15: byte 2048*t of each V half */
            WgmmaOps<T>::pv(o, pa[t], desc(lo_v, HI_V, t * 2048));
    };
    /*
     * Turns: the two warpgroups issue their tensor-core work alternately (named barriers
     * 1 and 2, 256 threads: 128 wait, 128 arrive), so that one warpgroup's softmax runs
     * while the other's products run. Warpgroup w waits for its turn on barrier 1 + w
     * and hands the turn over on barrier 2 - w. Warpgroup 1 hands the first turn to 0
     * now; both take the same number of turns, and warpgroup 0 takes the one handed
     * over after the last (at the end), so every arrival is matched by a wait.
     */
    bool alone = false; /* this item has rows for warpgroup 0 only (see below) */
    auto turn_wait = [&] {
        if (alone) return;
        if (wg == 0) asm volatile("bar.sync 1, 256;\n" ::: "memory");
        else asm volatile("bar.sync 2, 256;\n" ::: "memory");
    };
    auto turn_pass = [&] {
        if (alone) return;
        if (wg == 0) asm volatile("bar.arrive 2, 256;\n" ::: "memory");
        else asm volatile("bar.arrive 1, 256;\n" ::: "memory");
    };
    if (wg == 1) asm volatile("bar.arrive 1, 256;\n" ::: "memory");

    int n = 0; /* steps consumed (the producer's numbering) */
    for (int k = 0;; ++k) { /* items: header slot and Q buffer k & 1 */
        /* the item: its header, copied to registers and released at once */
        const int hs = k & 1;
        mbar_wait(sm.bar(HDR_FULL, hs), (k >> 1) & 1);
        const ItemHeader &hd = sm.hdr(hs);
        /* control values read from shared memory go through a shuffle: the compiler then
         * knows them warp-uniform (a wgmma on a path it takes for divergent serialises the
         * whole wgmma pipeline) */
        if (__shfl_sync(0xffffffffu, hd.item, 0) < 0) break;
        const int b = hd.b, h = hd.h, i0 = hd.i0, q_start = hd.q_start;
        const int q_rows = __shfl_sync(0xffffffffu, hd.q_rows, 0), rph = hd.rph;
        int qpos[2], qseg[2]; /* this thread's two rows: g and g + 8 of its warp's 16 */
        bool qglob[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int32_t rf = hd.rows[row_of[r]];
            qpos[r] = hd.p0 + row_of[r] % rph;
            qseg[r] = rf & ~ROW_GLOBAL;
            qglob[r] = (rf & ROW_GLOBAL) != 0;
        }
        mbar_arrive(sm.bar(HDR_EMPTY, hs));

        const int qs = hs;
        mbar_wait(sm.bar(Q_FULL, qs), (k >> 1) & 1);
        fence_proxy_async(); /* the copies' bytes, seen by the tensor cores */
        /* An item of at most 64 valid rows (a sequence's last, such as a global tail of 16
         * queries of three heads, which sees every key) leaves warpgroup 1 without rows: it
         * only paces itself through the item's steps, releasing each stage, and warpgroup 0
         * works alone, without taking turns (so both skip the same turns). */
        alone = q_rows <= 64;
        if (alone && wg == 1) {
            for (;;) {
                const int st = n & 1, use = n >> 1;
                mbar_wait(sm.bar(FULL_K, st), use & 1);
                mbar_wait(sm.bar(FULL_V, st), use & 1);
                const uint32_t e = s_entry[st];
                mbar_arrive(sm.bar(EMPTY_K, st));
                mbar_arrive(sm.bar(EMPTY_V, st));
                ++n;
                if ((e & (CLOSE_BIT | LAST_BIT)) == (CLOSE_BIT | LAST_BIT)) break;
            }
            mbar_arrive(sm.bar(Q_EMPTY, qs));
            continue;
        }
        lo_q = desc_lo(sm.q(qs) + wg * 64 * 128, 1);
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] = 0.f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
        bool pending = false; /* pa holds a P whose P V is still to be issued */

        for (;;) {
            const int st = n & 1, use = n >> 1;
            mbar_wait(sm.bar(FULL_K, st), use & 1);
            mbar_wait(sm.bar(FULL_V, st), use & 1);
            fence_proxy_async(); /* the copies' bytes, seen by the tensor cores */
            const uint32_t e = __shfl_sync(0xffffffffu, s_entry[st], 0);
            if (e & CLOSE_BIT) { /* closing step: P V of the round's last tile */
                turn_wait();
                if (pending) { /* (a round whose tiles were all empty has none) */
                    fence_pv_operands();
                    wgmma_fence();
                    issue_pv(st);
                    wgmma_commit();
                    turn_pass();
                    wgmma_wait<0>();
                    fence_regs<64>(o);
                } else {
                    turn_pass();
                }
                mbar_arrive(sm.bar(EMPTY_K, st));
                mbar_arrive(sm.bar(EMPTY_V, st));
                ++n;
                pending = false;
                if (e & LAST_BIT) break;
                continue;
            }
            /* One tile step, with the P V of the previous tile or (the first step of a
             * round) without. The two are separate code, so that every wgmma group is
             * unconditional: a group that may be empty is closed by a dummy wgmma, and
             * the wait for the scores then waits for P V too, holding back the release
             * of K and the mask arithmetic of a partial tile (8x1024+16: 3.5% slower). */
            auto tile_step = [&](auto with_pv) {
                /* S = Q K^T of this step's tile and P V of the previous one, issued in that
                 * order as one turn; K is released and the mask applied once S is in.
                 * (The Q K^T issue is unconditional: ptxas serialises the wgmma pipeline when
                 * an accumulator may or may not have been defined by one.) */
                const int j = (int)(e & TILE_BITS);
                const bool full = (e & FULL_BIT) != 0;
                turn_wait();
                fence_regs<64>(s);
                fence_pv_operands();
                wgmma_fence();
                issue_qk(st);
                wgmma_commit();
                if constexpr (decltype(with_pv)::value) {
                    issue_pv(st);
                    wgmma_commit();
                    turn_pass();
                    wgmma_wait<1>(); /* S is in */
                } else {
                    turn_pass();
                    wgmma_wait<0>();
                }
                fence_regs<64>(s);
                mbar_arrive(sm.bar(EMPTY_K, st));
                /* Full tiles keep raw scores (scaled inside the exponential); partial tiles get
                 * the scale, mask and bias here, in base 2. */
                float sc = a.scale_log2;
                if (!full && (e & CAUSAL_BIT)) { /* key <= query only: no facts to read */
                    sc = 1.f;
                    int lim[2]; /* the last column row r sees, less this thread's column 2 c4 */
#pragma unroll
                    for (int r = 0; r < 2; ++r) lim[r] = qpos[r] - j * BN - 2 * c4;
#pragma unroll
                    for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
                        for (int y = 0; y < 2; ++y)
#pragma unroll
                            for (int r = 0; r < 2; ++r) {
                                float &x = s[nb * 4 + r * 2 + y];
                                x = nb * 8 + y <= lim[r] ? x * a.scale_log2 : -INFINITY;
                            }
                } else if (!full) {
                    sc = 1.f;
                    const int32_t *fseg = sm.facts(n);
                    const float *fbias = reinterpret_cast<const float *>(fseg + BN);
#pragma unroll
                    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
                        for (int y = 0; y < 2; ++y) {
                            const int col = nb * 8 + 2 * c4 + y;
                            const int key = j * BN + col;
                            const int ks = fseg[col];
                            const float kb = fbias[col];
#pragma unroll
                            for (int r = 0; r < 2; ++r) {
                                const bool ok = key <= qpos[r] && (qglob[r] || ks == qseg[r] || ks < 0);
                                const float bias = qglob[r] ? kb : 0.f;
                                float &x = s[nb * 4 + r * 2 + y];
                                x = ok ? x * a.scale_log2 + bias : -INFINITY;
                            }
                        }
                    }
                }

                /* online softmax over this thread's two rows (a quad of lanes shares a row) */
                float m_new[2];
                bool move = false;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    /* four independent chains: the maximum is on the critical path */
                    float mx[4];
#pragma unroll
                    for (int c = 0; c < 4; ++c) mx[c] = fmaxf(s[c * 4 + 2 * r], s[c * 4 + 2 * r + 1]);
#pragma unroll
                    for (int nb = 4; nb < BN / 8; ++nb)
                        mx[nb & 3] = fmaxf(mx[nb & 3], fmaxf(s[nb * 4 + 2 * r], s[nb * 4 + 2 * r + 1]));
                    const float mt = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
                    m_new[r] = fmaxf(m[r], quad_max(mt) * sc); /* sc > 0 keeps the order */
                    move |= m_new[r] > m[r];
                }
                /* O and l are rescaled only when the maximum of some row of the warp moved (a
                 * warp-uniform branch): after the first tiles it rarely does. (Keeping a stale
                 * maximum for longer, up to a gap, would skip more rescales, but then the
                 * largest exponential of a row is no longer exactly 1 and the error of a
                 * sharply peaked row grows measurably; it saved no time here.) */
                move = __any_sync(0xffffffffu, move);
                float alpha[2] = {1.f, 1.f};
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    if (move) { /* alpha: 1 when unchanged, 0 from -inf (and for a row still empty) */
                        alpha[r] = fast_exp2(m[r] - (m_new[r] == -INFINITY ? 0.f : m_new[r]));
                        m[r] = m_new[r];
                    }
                    const float mbase = m[r] == -INFINITY ? 0.f : m[r];
                    float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int nb = 0; nb < BN / 8; ++nb) {
                        float &x0 = s[nb * 4 + 2 * r], &x1 = s[nb * 4 + 2 * r + 1];
                        x0 = fast_exp2(fmaf(x0, sc, -mbase));
                        x1 = fast_exp2(fmaf(x1, sc, -mbase));
                        sum[nb & 3] += x0 + x1;
                    }
                    l[r] = l[r] * alpha[r] + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
                }

                wgmma_wait<0>(); /* P V of the previous tile is done: O and pa are free */
                fence_pv_operands();
                mbar_arrive(sm.bar(EMPTY_V, st));
                if (move) {
#pragma unroll
                    for (int nb = 0; nb < 16; ++nb) {
                        o[nb * 4 + 0] *= alpha[0];
                        o[nb * 4 + 1] *= alpha[0];
                        o[nb * 4 + 2] *= alpha[1];
                        o[nb * 4 + 3] *= alpha[1];
                    }
                }

                /* P as the A fragments of 8 k-steps of 16 keys; its P V runs in the next step */
#pragma unroll
                for (int t = 0; t < BN / 16; ++t) {
                    pa[t][0] = Pack2<T>::pack(s[8 * t + 0], s[8 * t + 1]);
                    pa[t][1] = Pack2<T>::pack(s[8 * t + 2], s[8 * t + 3]);
                    pa[t][2] = Pack2<T>::pack(s[8 * t + 4], s[8 * t + 5]);
                    pa[t][3] = Pack2<T>::pack(s[8 * t + 6], s[8 * t + 7]);
                }
            };
            if (pending) tile_step(Flag<true>{});
            else tile_step(Flag<false>{});
            ++n;
            pending = true;
        }
        /* The item's output. Every product of the item is done, so this warpgroup's 64 rows
         * of the Q buffer are free: O goes there first (normalised, 16-bit, in Q's swizzled
         * layout, where the accumulator layout's stores meet no bank conflict), then to global
         * memory as 16-byte chunks, 16 threads to a row. Stored straight from the accumulator
         * layout, each warp store wrote 16 bytes to each of 8 rows; those 32 stores per thread
         * took ~3,900 cycles per item in a clock trace on an H100, the length of a whole tile
         * step, while the tensor cores waited for the next item. The Q buffer is handed back
         * once the chunks are read. (The op allocates the output, so its rows are 16-byte
         * aligned.) */
        uint8_t *q_buf = sm.p + OFF_Q + qs * QBUF;
        /* global row of tile row rr: head h + rr / rph, row i0 + rr % rph (rph = BM unless
         * the item packs heads) */
        auto out_row = [&](int rr, int &hh, int &i) {
            hh = h;
            i = i0 + rr;
            if (rph != BM) {
                hh = h + rr / rph;
                i = i0 + rr % rph;
            }
        };
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float lt = quad_sum(l[r]);
            const float inv = lt > 0.f ? 1.f / lt : 0.f;
            const int rr = row_of[r];
            uint8_t *srow = q_buf + rr * 128;
#pragma unroll
            for (int nb = 0; nb < 16; ++nb) { /* columns 8nb + 2c4, +1: chunk nb % 8 of half nb / 8 */
                const uint32_t pk = Pack2<T>::pack(o[nb * 4 + 2 * r] * inv, o[nb * 4 + 2 * r + 1] * inv);
                *reinterpret_cast<uint32_t *>(srow + (nb >> 3) * HALF_Q + (((nb & 7) ^ (rr & 7)) << 4) + c4 * 4) = pk;
            }
            if (a.lse != nullptr && c4 == 0 && rr < q_rows) {
                int hh, i;
                out_row(rr, hh, i);
                a.lse[b * a.lse_sb + hh * a.lse_sh + q_start + i] =
                    lt > 0.f ? (m[r] + log2f(lt)) * kLn2 : -INFINITY;
            }
        }
        if (wg == 0) asm volatile("bar.sync 4, 128;\n" ::: "memory");
        else asm volatile("bar.sync 5, 128;\n" ::: "memory");
        {
            const int t = tid & 127, ch = t & 15;
#pragma unroll
            for (int it = 0; it < 8; ++it) {
                const int rr = wg * 64 + (t >> 4) + 8 * it;
                if (rr >= q_rows) break;
                const uint4 v = *reinterpret_cast<const uint4 *>(q_buf + (ch >> 3) * HALF_Q + rr * 128 +
                                                                 (((ch & 7) ^ (rr & 7)) << 4));
                int hh, i;
                out_row(rr, hh, i);
                *reinterpret_cast<uint4 *>(a.out + b * a.o_sb + hh * a.o_sh + (int64_t)(q_start + i) * a.o_st +
                                           ch * 8) = v;
            }
        }
        mbar_arrive(sm.bar(Q_EMPTY, qs)); /* every product of the item is done, O read back */
    }
    alone = false; /* the closing wait is a real one, whatever the last item was */
    if (wg == 0) turn_wait(); /* the turn warpgroup 1 handed over after the last */
}

/* ------------------------------------------------------------ the kernel */

template <typename T>
__global__ void __launch_bounds__(THREADS, 1)
    prefill_sm90_kernel(const PrefillArgs a, int n_items, int tiles, int heads, int sched_pair)
{
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t raw = smem_addr(smem_raw);
    Smem sm;
    sm.base = (raw + 1023u) & ~1023u;
    sm.p = smem_raw + (sm.base - raw);
    const int tid = threadIdx.x;

    if (tid == 0) {
        for (int i = 0; i < 2; ++i) {
            /* FULL_K: each producer thread's copies and its facts; FULL_V, Q_FULL: copies */
            mbar_init(sm.bar(FULL_K, i), 2 * PRODUCERS);
            mbar_init(sm.bar(FULL_V, i), PRODUCERS);
            mbar_init(sm.bar(EMPTY_K, i), CONSUMERS);
            mbar_init(sm.bar(EMPTY_V, i), CONSUMERS);
            mbar_init(sm.bar(Q_FULL, i), PRODUCERS);
            mbar_init(sm.bar(Q_EMPTY, i), CONSUMERS);
            mbar_init(sm.bar(HDR_FULL, i), PRODUCERS);
            mbar_init(sm.bar(HDR_EMPTY, i), CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads(); /* the barriers are initialised */

    if (tid >= CONSUMERS) {
        /* The producer needs few registers; hand them to the consumers. */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        produce(a, sm, n_items, tiles, heads, g_sched + 2 * sched_pair, tid - CONSUMERS);
        return;
    }
    /* (the consumers' path is not a branch of an if: ptxas treats wgmma inside one as
     * divergent and serialises them) */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
    consume<T>(a, sm, tid);
#else
    __trap(); /* built without sm_90a: the launcher never selects this kernel there */
#endif
}

/* The scheduler pair of a launch: consecutive launches take consecutive pairs. */
int take_sched_pair()
{
    static unsigned int cursor = 0;
    return (int)(__atomic_fetch_add(&cursor, 1u, __ATOMIC_RELAXED) % (unsigned int)SCHED_POOL);
}

template <typename T>
sf_status launch(const PrefillArgs &a, int heads_q, int batch, int max_q_len, int sms,
                 cudaStream_t stream)
{
    static unsigned long long configured = 0;
    if (!configure_once((const void *)prefill_sm90_kernel<T>, SMEM_BYTES, &configured))
        return SF_ERR_CUDA;
    const int tiles = (max_q_len + BM - 1) / BM;
    const long long n_items = (long long)heads_q * tiles * batch;
    if (n_items > INT32_MAX) return SF_ERR_ARGUMENT;
    const int grid = (int)std::min<long long>(n_items, std::max(sms, 1));
    prefill_sm90_kernel<T><<<grid, THREADS, SMEM_BYTES, stream>>>(a, (int)n_items, tiles, heads_q,
                                                                  take_sched_pair());
    return last_launch_status();
}

} // namespace

sf_status launch_prefill_sm90(const PrefillArgs &a, bool bf16, int heads_q, int batch,
                              int max_q_len, int sms, cudaStream_t stream)
{
    return bf16 ? launch<__nv_bfloat16>(a, heads_q, batch, max_q_len, sms, stream)
                : launch<__half>(a, heads_q, batch, max_q_len, sms, stream);
}

} // namespace sfcuda

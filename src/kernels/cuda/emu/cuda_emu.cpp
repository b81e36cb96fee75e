// The runtime of the host CUDA emulator (see cuda_emu.h): runs a grid's blocks one after
// another on the calling OS thread, the threads of a block as cooperative fibers.
//
// Fibers switch with a few lines of assembly on x86-64 (callee-saved registers and the
// stack pointer); elsewhere, or with -DFT_EMU_UCONTEXT, through ucontext (slower: a system
// call per switch). Each fiber has its own stack (FT_EMU_STACK_KB, default 512 KiB, with a
// guard page); stacks are allocated per OS thread on first use and kept until it exits.
//
// Scheduling: a fiber runs until it waits at a barrier or exits, then switches straight to
// the next runnable fiber of the block (thread order in even blocks, reverse order in odd
// ones). The last arrival at a barrier releases the others and carries on. Warp operations
// are exchanged by the last lane to arrive, which writes every lane's result before
// releasing them, so consecutive shuffles never reuse a slot that is still to be read.
//
// Exported symbols: ft_emu_rt_* only (the header's interface).
#if !defined(__x86_64__) && !defined(FT_EMU_UCONTEXT)
#define FT_EMU_UCONTEXT 1
#endif
#if defined(FT_EMU_UCONTEXT) && defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600
#endif

#include "cuda_emu.h"

#include <mutex>
#include <cstdarg>
#include <sys/mman.h>
#include <unistd.h>
#ifdef FT_EMU_UCONTEXT
#include <ucontext.h>
#endif

#if !defined(FT_EMU_UCONTEXT)
// void ft_emu_rt_switch(void** save_sp, void* new_sp): saves the callee-saved registers on
// the current stack, stores the stack pointer in *save_sp, continues on new_sp.
// ft_emu_rt_start: a new fiber's first "return address": calls r13(r12).
#if defined(__APPLE__)
#define FT_EMU_SYM(x) "_" #x
#define FT_EMU_TYPE(x) ""
#define FT_EMU_SIZE(x) ""
#else
#define FT_EMU_SYM(x) #x
#define FT_EMU_TYPE(x) ".type " #x ",@function\n"
#define FT_EMU_SIZE(x) ".size " #x ",.-" #x "\n"
#endif
asm(".text\n"
    ".globl " FT_EMU_SYM(ft_emu_rt_switch) "\n"
#if !defined(__APPLE__)
    ".hidden ft_emu_rt_switch\n"
#endif
    FT_EMU_TYPE(ft_emu_rt_switch)
    ".p2align 4\n"
    FT_EMU_SYM(ft_emu_rt_switch) ":\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    FT_EMU_SIZE(ft_emu_rt_switch)
    ".globl " FT_EMU_SYM(ft_emu_rt_start) "\n"
#if !defined(__APPLE__)
    ".hidden ft_emu_rt_start\n"
#endif
    FT_EMU_TYPE(ft_emu_rt_start)
    ".p2align 4\n"
    FT_EMU_SYM(ft_emu_rt_start) ":\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n"
    FT_EMU_SIZE(ft_emu_rt_start));
extern "C" void ft_emu_rt_switch(void** save_sp, void* new_sp);
extern "C" void ft_emu_rt_start(void);
#endif

namespace {

enum State : unsigned char { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Ctx {
#ifdef FT_EMU_UCONTEXT
    ucontext_t uc;
#else
    void* sp;
#endif
};

struct Fiber {
    Ctx ctx;
    unsigned memo_calls;  // memo lookups so far in this block
    ft_emu_thread_view view;
    unsigned linear;  // thread index within the block
    unsigned warp, lane;
    State state;
    // warp operation in progress
    int op;
    int src;
    const void* in;
    void* out;
    unsigned size;
};

struct Warp {
    unsigned exist;    // lanes that exist
    unsigned done;     // lanes that exited
    unsigned arrived;  // lanes waiting at the pending warp barrier
    unsigned mask;     // its mask
    int op;            // and operation
};

// Memo entries per warp (a ring indexed by the lane's lookup count): enough for the
// lookups a lane makes between two warp barriers in ferrotune's kernels (up to 64).
constexpr unsigned kMemoEntries = 96;
constexpr unsigned kMemoBytes = 4096;  // inputs + output of one entry
struct MemoEntry {
    unsigned seq;  // lookup count + 1 of the lane that stored it; 0: empty
    unsigned n1, n2, n3, n_out;
    alignas(16) unsigned char data[kMemoBytes];
};

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;
constexpr unsigned kStaticSmemLimit = 48u * 1024u;
constexpr unsigned kCanary = 256;

struct Block {
    const char* name;
    void (*body)(const void*);
    const void* params;
    unsigned n;  // threads
    unsigned nwarps;
    unsigned n_done;
    unsigned n_bwait;  // threads waiting at __syncthreads
    int dir;           // +1 or -1: order in which runnable fibers are picked
    Ctx main;
    unsigned char* dyn;
    unsigned dyn_size;
    Fiber* fibers;
    Warp warps[kMaxWarps];
};

// Per OS thread: the fibers and their stacks (kept between launches), the block running.
struct Pool {
    Fiber* fibers = nullptr;
    unsigned char** stacks = nullptr;
    unsigned n_stacks = 0;
    size_t stack_size = 0;
    unsigned char* dyn = nullptr;  // dynamic shared memory (+ canary)
    MemoEntry* memo[kMaxThreads / 32] = {};  // per warp, allocated on first use
    ~Pool() {
        for (MemoEntry* m : memo) std::free(m);
        for (unsigned i = 0; i < n_stacks; ++i) munmap(stacks[i], stack_size + page());
        std::free(stacks);
        std::free(fibers);
        std::free(dyn);
    }
    static size_t page() { return (size_t)sysconf(_SC_PAGESIZE); }
};

thread_local Pool tl_pool;
thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;

size_t stack_size() {
    static size_t size = [] {
        size_t kb = 512;
        if (const char* e = std::getenv("FT_EMU_STACK_KB")) {
            long v = std::atol(e);
            if (v >= 64) kb = (size_t)v;
        }
        const size_t pg = Pool::page();
        return (kb * 1024 + pg - 1) / pg * pg;
    }();
    return size;
}

void ensure_fibers(unsigned n) {
    Pool& p = tl_pool;
    if (!p.fibers) {
        p.fibers = static_cast<Fiber*>(std::calloc(kMaxThreads, sizeof(Fiber)));
        p.stacks = static_cast<unsigned char**>(std::calloc(kMaxThreads, sizeof(unsigned char*)));
        p.stack_size = stack_size();
        if (!p.fibers || !p.stacks) ft_emu_rt_fail("out of memory for the fibers");
    }
    const size_t pg = Pool::page();
    while (p.n_stacks < n) {
        void* m = mmap(nullptr, p.stack_size + pg, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) ft_emu_rt_fail("cannot map a fiber stack of %zu bytes", p.stack_size);
        mprotect(m, pg, PROT_NONE);  // guard page below the stack
        p.stacks[p.n_stacks++] = static_cast<unsigned char*>(m);
    }
}

void describe_thread(const Fiber* f, char* buf, size_t n) {
    std::snprintf(buf, n, "thread (%u,%u,%u) of block (%u,%u,%u)", f->view.tid.x,
                  f->view.tid.y, f->view.tid.z, f->view.bid.x,
                  f->view.bid.y, f->view.bid.z);
}

void fiber_main(Fiber* f);

#ifdef FT_EMU_UCONTEXT
void uc_entry(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
void ctx_init(Fiber* f, unsigned char* stack, size_t size) {
    getcontext(&f->ctx.uc);
    f->ctx.uc.uc_stack.ss_sp = stack;
    f->ctx.uc.uc_stack.ss_size = size;
    f->ctx.uc.uc_link = nullptr;
    const uintptr_t v = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->ctx.uc, (void (*)())uc_entry, 2, (unsigned)(v >> 32), (unsigned)(v & 0xffffffffu));
}
void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
#else
void ctx_init(Fiber* f, unsigned char* stack, size_t size) {
    // Frame popped by ft_emu_rt_switch: r15 r14 r13 r12 rbx rbp, then the return address
    // (ft_emu_rt_start), placed so that rsp % 16 == 0 when ft_emu_rt_start calls.
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~(uintptr_t)15;
    uintptr_t* ret = reinterpret_cast<uintptr_t*>(top - 24);  // ret % 16 == 8
    ret[0] = reinterpret_cast<uintptr_t>(&ft_emu_rt_start);
    uintptr_t* regs = ret - 6;
    regs[0] = 0;                                            // r15
    regs[1] = 0;                                            // r14
    regs[2] = reinterpret_cast<uintptr_t>(&fiber_main);     // r13
    regs[3] = reinterpret_cast<uintptr_t>(f);               // r12
    regs[4] = 0;                                            // rbx
    regs[5] = 0;                                            // rbp
    f->ctx.sp = regs;
}
void ctx_switch(Ctx* from, Ctx* to) { ft_emu_rt_switch(&from->sp, to->sp); }
#endif

[[noreturn]] void deadlock(Block* b) {
    char msg[256];
    unsigned nb = 0, nw = 0;
    const Fiber* first_w = nullptr;
    for (unsigned i = 0; i < b->n; ++i) {
        if (b->fibers[i].state == WAIT_BLOCK) ++nb;
        if (b->fibers[i].state == WAIT_WARP) {
            ++nw;
            if (!first_w) first_w = &b->fibers[i];
        }
    }
    msg[0] = 0;
    if (first_w) describe_thread(first_w, msg, sizeof msg);
    ft_emu_rt_fail("deadlock in block (%u,%u,%u): %u thread(s) wait at __syncthreads, %u at a warp "
                   "barrier%s%s, %u exited",
                   b->fibers[0].view.bid.x, b->fibers[0].view.bid.y,
                   b->fibers[0].view.bid.z, nb, nw, first_w ? " (first: " : "",
                   first_w ? (std::strcat(msg, ")"), msg) : "", b->n_done);
}

// The calling fiber stops running (it waits or exited): switch to the next runnable one, or
// back to the launcher when every fiber exited.
void suspend(Fiber* me) {
    Block* b = tl_block;
    const unsigned n = b->n;
    unsigned i = me->linear;
    for (unsigned k = 1; k <= n; ++k) {
        i = b->dir > 0 ? (i + 1 == n ? 0 : i + 1) : (i == 0 ? n - 1 : i - 1);
        Fiber* f = &b->fibers[i];
        if (f->state == READY) {
            if (f == me) return;
            tl_fiber = f;
            ctx_switch(&me->ctx, &f->ctx);
            tl_fiber = me;
            return;
        }
    }
    if (b->n_done == n) {
        tl_fiber = nullptr;
        ctx_switch(&me->ctx, &b->main);
        ft_emu_rt_fail("internal error: a finished fiber was resumed");
    }
    deadlock(b);
}

void fiber_main(Fiber* f) {
    Block* b = tl_block;
    b->body(b->params);
    f->state = DONE;
    b->n_done++;
    char who[128];
    if (b->n_bwait) {
        describe_thread(f, who, sizeof who);
        ft_emu_rt_fail("%s exited while %u thread(s) of its block wait at __syncthreads: not every "
                       "thread reaches that barrier",
                       who, b->n_bwait);
    }
    Warp& w = b->warps[f->warp];
    w.done |= 1u << f->lane;
    if (w.arrived && (w.mask & (1u << f->lane))) {
        describe_thread(f, who, sizeof who);
        ft_emu_rt_fail("%s exited while lanes of its warp wait for it at a warp barrier (mask 0x%08x)",
                       who, w.mask);
    }
    suspend(f);
    ft_emu_rt_fail("internal error: an exited fiber continued");
}

void run_block(Block* b) {
    const unsigned n = b->n;
    const size_t ss = tl_pool.stack_size, pg = Pool::page();
    for (unsigned i = 0; i < n; ++i) ctx_init(&b->fibers[i], tl_pool.stacks[i] + pg, ss);
    Fiber* first = &b->fibers[b->dir > 0 ? 0 : n - 1];
    tl_fiber = first;
    ctx_switch(&b->main, &first->ctx);
    tl_fiber = nullptr;
}

}  // namespace

extern "C" {

const ft_emu_thread_view* ft_emu_rt_view(void) {
    Fiber* f = tl_fiber;
    if (!f) ft_emu_rt_fail("threadIdx/blockIdx/blockDim/gridDim used outside a kernel");
    return &f->view;
}

void ft_emu_rt_fail(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const Block* b = tl_block;
    const Fiber* f = tl_fiber;
    if (b && f)
        std::fprintf(stderr,
                     "ferrotune CUDA emulator: kernel %s, thread (%u,%u,%u) of block (%u,%u,%u): %s\n",
                     b->name, f->view.tid.x, f->view.tid.y, f->view.tid.z,
                     f->view.bid.x, f->view.bid.y, f->view.bid.z, msg);
    else if (b)
        std::fprintf(stderr, "ferrotune CUDA emulator: kernel %s: %s\n", b->name, msg);
    else
        std::fprintf(stderr, "ferrotune CUDA emulator: %s\n", msg);
    std::fflush(stderr);
    std::abort();
}

void ft_emu_rt_syncthreads(void) {
    Fiber* me = tl_fiber;
    Block* b = tl_block;
    if (!me) ft_emu_rt_fail("__syncthreads outside a kernel");
    if (b->n_done)
        ft_emu_rt_fail("__syncthreads reached after %u thread(s) of the block exited: not every "
                       "thread reaches this barrier",
                       b->n_done);
    if (b->n_bwait + 1 == b->n) {
        for (unsigned i = 0; i < b->n; ++i)
            if (b->fibers[i].state == WAIT_BLOCK) b->fibers[i].state = READY;
        b->n_bwait = 0;
        return;
    }
    me->state = WAIT_BLOCK;
    b->n_bwait++;
    suspend(me);
}

void ft_emu_rt_warp(int op, unsigned mask, const void* in, unsigned size, int src, void* out) {
    Fiber* me = tl_fiber;
    Block* b = tl_block;
    if (!me) ft_emu_rt_fail("warp operation outside a kernel");
    Warp& w = b->warps[me->warp];
    const unsigned bit = 1u << me->lane;
    if (!(mask & bit)) ft_emu_rt_fail("warp operation with mask 0x%08x that excludes the calling lane %u", mask, me->lane);
    if (mask & ~w.exist)
        ft_emu_rt_fail("warp operation with mask 0x%08x names lanes that do not exist (the warp has 0x%08x)", mask, w.exist);
    if (mask & w.done)
        ft_emu_rt_fail("warp operation with mask 0x%08x names lanes that exited (0x%08x)", mask, w.done);
    if (w.arrived == 0) {
        w.mask = mask;
        w.op = op;
    } else if (w.mask != mask || w.op != op) {
        ft_emu_rt_fail("lanes of one warp meet at different warp operations or masks (0x%08x op %d "
                       "vs 0x%08x op %d): divergent warp-synchronous code",
                       w.mask, w.op, mask, op);
    }
    if (op == FT_EMU_SHFL && src >= 0 && !(mask & (1u << src)))
        ft_emu_rt_fail("shuffle from lane %d, which is not in the mask 0x%08x", src, mask);
    me->op = op;
    me->src = src;
    me->in = in;
    me->out = out;
    me->size = size;
    w.arrived |= bit;
    if (w.arrived != mask) {
        me->state = WAIT_WARP;
        suspend(me);
        return;
    }
    // Last to arrive: deliver every lane's result, then release the lanes.
    const unsigned base = me->warp * 32;
    if (op == FT_EMU_SHFL) {
        for (unsigned l = 0; l < 32; ++l) {
            if (!(mask & (1u << l))) continue;
            Fiber* f = &b->fibers[base + l];
            const Fiber* from = f->src < 0 ? f : &b->fibers[base + (unsigned)f->src];
            if (from->size != f->size) ft_emu_rt_fail("shuffle of different sizes within a warp");
            std::memcpy(f->out, from->in, f->size);
        }
    } else if (op == FT_EMU_VOTE) {
        unsigned ballot = 0;
        for (unsigned l = 0; l < 32; ++l)
            if ((mask & (1u << l)) && *static_cast<const int*>(b->fibers[base + l].in) != 0) ballot |= 1u << l;
        for (unsigned l = 0; l < 32; ++l)
            if (mask & (1u << l)) *static_cast<unsigned*>(b->fibers[base + l].out) = ballot;
    }
    for (unsigned l = 0; l < 32; ++l)
        if ((mask & (1u << l)) && l != me->lane) b->fibers[base + l].state = READY;
    w.arrived = 0;
}

int ft_emu_rt_memo_get(const void* in1, unsigned n1, const void* in2, unsigned n2, const void* in3,
                       unsigned n3, void* out, unsigned n_out) {
    Fiber* me = tl_fiber;
    if (!me) ft_emu_rt_fail("warp memo used outside a kernel");
    const unsigned k = me->memo_calls++;
    MemoEntry* ring = tl_pool.memo[me->warp];
    if (!ring) return 0;
    const MemoEntry& e = ring[k % kMemoEntries];
    if (e.seq != k + 1 || e.n1 != n1 || e.n2 != n2 || e.n3 != n3 || e.n_out != n_out) return 0;
    if (std::memcmp(e.data, in1, n1) != 0 || std::memcmp(e.data + n1, in2, n2) != 0 ||
        std::memcmp(e.data + n1 + n2, in3, n3) != 0)
        return 0;
    std::memcpy(out, e.data + n1 + n2 + n3, n_out);
    return 1;
}

void ft_emu_rt_memo_put(const void* in1, unsigned n1, const void* in2, unsigned n2, const void* in3,
                        unsigned n3, const void* out, unsigned n_out) {
    Fiber* me = tl_fiber;
    if (!me) ft_emu_rt_fail("warp memo used outside a kernel");
    if (n1 + n2 + n3 + n_out > kMemoBytes) return;
    MemoEntry*& ring = tl_pool.memo[me->warp];
    if (!ring) {
        ring = static_cast<MemoEntry*>(std::calloc(kMemoEntries, sizeof(MemoEntry)));
        if (!ring) return;
    }
    MemoEntry& e = ring[(me->memo_calls - 1) % kMemoEntries];  // this lane's last lookup
    e.seq = me->memo_calls;
    e.n1 = n1;
    e.n2 = n2;
    e.n3 = n3;
    e.n_out = n_out;
    std::memcpy(e.data, in1, n1);
    std::memcpy(e.data + n1, in2, n2);
    std::memcpy(e.data + n1 + n2, in3, n3);
    std::memcpy(e.data + n1 + n2 + n3, out, n_out);
}

void* ft_emu_rt_dyn_smem(void) {
    Block* b = tl_block;
    if (!b || !tl_fiber) ft_emu_rt_fail("dynamic shared memory used outside a kernel");
    return b->dyn;
}

void ft_emu_rt_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                      unsigned by, unsigned bz, unsigned smem_bytes, void (*body)(const void*),
                      const void* params) {
    if (tl_block)
        ft_emu_rt_fail("kernel %s launched from inside kernel %s (no dynamic parallelism here)",
                       name, tl_block->name);
    if (!gx || !gy || !gz || !bx || !by || !bz)
        ft_emu_rt_fail("kernel %s: empty launch, grid (%u,%u,%u) block (%u,%u,%u)", name, gx, gy,
                       gz, bx, by, bz);
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (bx > 1024 || by > 1024 || bz > 64 || threads > kMaxThreads)
        ft_emu_rt_fail("kernel %s: block (%u,%u,%u) is out of range (x, y <= 1024, z <= 64, at "
                       "most 1024 threads)",
                       name, bx, by, bz);
    if (gx > 2147483647u || gy > 65535u || gz > 65535u)
        ft_emu_rt_fail("kernel %s: grid (%u,%u,%u) is out of range (x < 2^31, y and z <= 65535)",
                       name, gx, gy, gz);
    if (smem_bytes > kStaticSmemLimit)
        ft_emu_rt_fail("kernel %s: %u bytes of dynamic shared memory requested; above 48 KB a "
                       "launch needs the cudaFuncAttributeMaxDynamicSharedMemorySize opt-in, "
                       "which ferrotune's launcher does not set",
                       name, smem_bytes);
    const unsigned n = (unsigned)threads;
    // One launch at a time in the process: the kernels' __shared__ arrays are statics.
    static std::mutex launch_lock;
    std::lock_guard<std::mutex> hold(launch_lock);
    ensure_fibers(n);
    Pool& pool = tl_pool;
    if (!pool.dyn) {
        pool.dyn = static_cast<unsigned char*>(std::aligned_alloc(128, kStaticSmemLimit + kCanary));
        if (!pool.dyn) ft_emu_rt_fail("out of memory for the dynamic shared memory");
    }

    Block b;
    b.name = name;
    b.body = body;
    b.params = params;
    b.n = n;
    b.nwarps = (n + 31) / 32;
    b.dyn = pool.dyn;
    b.dyn_size = smem_bytes;
    b.fibers = pool.fibers;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                const unsigned long long linear = x + (unsigned long long)gx * (y + (unsigned long long)gy * z);
                b.dir = (linear & 1) ? -1 : 1;
                b.n_done = 0;
                b.n_bwait = 0;
                for (unsigned w = 0; w < b.nwarps; ++w) {
                    const unsigned cnt = n - 32 * w >= 32 ? 32 : n - 32 * w;
                    b.warps[w].exist = cnt == 32 ? 0xffffffffu : ((1u << cnt) - 1);
                    b.warps[w].done = 0;
                    b.warps[w].arrived = 0;
                    b.warps[w].mask = 0;
                    b.warps[w].op = 0;
                }
                for (unsigned w = 0; w < b.nwarps; ++w)
                    if (pool.memo[w])
                        for (unsigned e = 0; e < kMemoEntries; ++e) pool.memo[w][e].seq = 0;
                for (unsigned i = 0; i < n; ++i) {
                    Fiber& f = b.fibers[i];
                    f.memo_calls = 0;
                    f.view.tid = uint3{i % bx, (i / bx) % by, i / (bx * by)};
                    f.view.bid = uint3{x, y, z};
                    f.view.bdim = dim3(bx, by, bz);
                    f.view.gdim = dim3(gx, gy, gz);
                    f.linear = i;
                    f.warp = i / 32;
                    f.lane = i % 32;
                    f.state = READY;
                }
                if (smem_bytes) std::memset(b.dyn, 0xff, smem_bytes);  // NaN everywhere
                std::memset(b.dyn + smem_bytes, 0xa5, kCanary);
                tl_block = &b;
                run_block(&b);
                for (unsigned i = 0; i < kCanary; ++i)
                    if (b.dyn[smem_bytes + i] != 0xa5)
                        ft_emu_rt_fail("block (%u,%u,%u) wrote past the %u bytes of dynamic shared "
                                       "memory the launch requested",
                                       x, y, z, smem_bytes);
                tl_block = nullptr;
            }
}
}

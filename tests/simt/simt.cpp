// The SIMT emulator's runtime (see simt.h): fibers, the per-block scheduler, barriers, warp
// collectives and the launch checks.
#include "simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#endif

#if !defined(__x86_64__) || defined(SIMT_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace simt {

Config& config() {
  static Config c;
  return c;
}

Stats& stats() {
  static Stats s;
  return s;
}

namespace detail {

FiberHead* g_cur = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;

// ---- context switch ------------------------------------------------------------------------
#if defined(SIMT_USE_UCONTEXT)
struct Context {
  ucontext_t uc;
};
// Every fiber's entry is fiber_main, and the scheduler sets g_cur to the fiber it resumes
// before the switch, so the trampoline needs no argument of its own.
static void (*g_entry)(void*) = nullptr;
static void ucontext_trampoline() { g_entry(g_cur); }
static void ctx_make(Context* c, void* stack, size_t size, void (*entry)(void*), void*) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  g_entry = entry;
  makecontext(&c->uc, ucontext_trampoline, 0);
}
static void ctx_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#else
// Saves the callee-saved registers, MXCSR and the x87 control word of the running context on
// its stack, stores its stack pointer in *save_sp and resumes the context whose stack pointer
// is new_sp. No system call (swapcontext makes one to save the signal mask).
extern "C" void fusedjd_simt_switch(void** save_sp, void* new_sp);
extern "C" void fusedjd_simt_trampoline();
asm(R"(
  .pushsection .text
  .globl fusedjd_simt_switch
  .type fusedjd_simt_switch,@function
  .p2align 4
fusedjd_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fusedjd_simt_switch,.-fusedjd_simt_switch

  .globl fusedjd_simt_trampoline
  .type fusedjd_simt_trampoline,@function
  .p2align 4
fusedjd_simt_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  callq *%r13
  ud2
  .size fusedjd_simt_trampoline,.-fusedjd_simt_trampoline
  .popsection
)");

struct Context {
  void* sp = nullptr;
};

static void ctx_make(Context* c, void* stack, size_t size, void (*entry)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~static_cast<uintptr_t>(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                        // keeps the frame inside the stack
  *--sp = reinterpret_cast<uint64_t>(&fusedjd_simt_trampoline);     // ret
  *--sp = 0;                                                        // rbp
  *--sp = 0;                                                        // rbx
  *--sp = reinterpret_cast<uint64_t>(arg);                          // r12: the trampoline's argument
  *--sp = reinterpret_cast<uint64_t>(entry);                        // r13: the function it calls
  *--sp = 0;                                                        // r14
  *--sp = 0;                                                        // r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  c->sp = sp;
}
static void ctx_switch(Context* from, Context* to) { fusedjd_simt_switch(&from->sp, to->sp); }
#endif

// ---- fibers and the launch -----------------------------------------------------------------
enum class State : uint8_t { kRunnable, kAtWarp, kAtBarrier, kExited };

struct Fiber : FiberHead {
  Context ctx;
  void* stack = nullptr;
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping for this fiber's stack
  int linear = 0;
  State state = State::kRunnable;
  Op op = Op::kSyncWarp;
  unsigned mask = 0;
  int arg = 0;
  int width = 32;
  uint64_t bits = 0;
  uint64_t result = 0;
};

#if defined(SIMT_ASAN)
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kMaxDynamicSmemDefault = 48 * 1024;
constexpr size_t kMaxDynamicSmemOptIn = 227 * 1024;  // sm_90

struct Launch {
  const char* kernel = "";
  dim3 grid, block;
  size_t smem = 0;
  Body body{};
  std::vector<Fiber> fibers;
  Context sched;
  void* smem_buf = nullptr;
  std::exception_ptr error;
};

static Launch* g_launch = nullptr;
static const void* g_sched_stack_bottom = nullptr;
static size_t g_sched_stack_size = 0;
static void* g_sched_fake_stack = nullptr;

static std::string where() {
  std::ostringstream s;
  s << "simt: kernel `" << (g_launch ? g_launch->kernel : "?") << "`";
  if (g_launch) {
    s << " (grid (" << g_grid_dim.x << "," << g_grid_dim.y << "," << g_grid_dim.z << "), block ("
      << g_block_dim.x << "," << g_block_dim.y << "," << g_block_dim.z << "), blockIdx (" << g_block_idx.x << ","
      << g_block_idx.y << "," << g_block_idx.z << ")";
    if (g_cur) s << ", threadIdx (" << g_cur->tid.x << "," << g_cur->tid.y << "," << g_cur->tid.z << ")";
    s << ")";
  }
  return s.str();
}

void fail(const std::string& rule) { throw std::runtime_error(where() + ": " + rule); }

static const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kBallot: return "__ballot_sync";
  }
  return "?";
}

static std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof(b), "0x%08x", v);
  return b;
}

// Fiber -> scheduler. `exiting`: the fiber will never run again.
static void to_scheduler(Fiber* f, bool exiting) {
  g_cur = nullptr;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, g_sched_stack_bottom, g_sched_stack_size);
#else
  (void)exiting;
#endif
  ctx_switch(&f->ctx, &g_launch->sched);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f->fake_stack, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
}

// Scheduler -> fiber, until it reaches its next sync point or exits.
static void resume(Fiber* f) {
  ++stats().switches;
  g_cur = f;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(&g_sched_fake_stack, f->stack, f->stack_size);
#endif
  ctx_switch(&g_launch->sched, &f->ctx);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(g_sched_fake_stack, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

static void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  try {
    g_launch->body.fn(g_launch->body.ctx);
  } catch (...) {
    if (!g_launch->error) g_launch->error = std::current_exception();
  }
  f->state = State::kExited;
  to_scheduler(f, /*exiting=*/true);
  std::abort();  // an exited fiber is never resumed
}

// Fiber stacks, reused from launch to launch; each has a guard page below it.
static std::vector<void*>& stack_pool() {
  static std::vector<void*> pool;
  return pool;
}

static void* stack_at(size_t i) {
  auto& pool = stack_pool();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    pool.push_back(static_cast<char*>(p) + page);
  }
#if defined(SIMT_ASAN)
  __asan_unpoison_memory_region(pool[i], kStackBytes);  // frames left by an abandoned fiber
#endif
  return pool[i];
}


static Fiber* running(const char* what) {
  if (g_cur == nullptr || g_launch == nullptr)
    throw std::runtime_error(std::string("simt: ") + what + " called outside a kernel");
  return static_cast<Fiber*>(g_cur);
}

uint64_t warp_collective(Op op, unsigned mask, uint64_t bits, int arg, int width) {
  Fiber* f = running(op_name(op));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(op_name(op)) + " with width " + std::to_string(width) + ": width must be a power of 2 in [1, 32]");
  f->state = State::kAtWarp;
  f->op = op;
  f->mask = mask;
  f->bits = bits;
  f->arg = arg;
  f->width = width;
  to_scheduler(f, false);
  return f->result;
}

void sync_threads() {
  Fiber* f = running("__syncthreads");
  f->state = State::kAtBarrier;
  to_scheduler(f, false);
}

void* dynamic_smem() {
  running("extern __shared__");
  return g_launch->smem_buf;
}

// Completes every warp collective whose lanes have all arrived; fails on a broken rule.
static bool resolve_warps(Launch& L, int nthreads) {
  bool progress = false;
  const int nwarps = (nthreads + 31) / 32;
  for (int w = 0; w < nwarps; ++w) {
    const int base = w * 32;
    const int lanes = std::min(32, nthreads - base);
    unsigned done = 0;
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = L.fibers[base + l];
      if (f.state != State::kAtWarp || ((done >> l) & 1u)) continue;
      const unsigned M = f.mask;
      const std::string at = std::string(op_name(f.op)) + "(mask " + hex(M) + ")";
      g_cur = &f;  // errors name this thread
      if (!((M >> l) & 1u)) fail("lane " + std::to_string(l) + " calls " + at + ", whose mask does not name itself");
      for (int q = 0; q < 32; ++q) {
        if (!((M >> q) & 1u)) continue;
        if (q >= lanes)
          fail(at + " names lane " + std::to_string(q) + " of warp " + std::to_string(w) +
               ", which does not exist (the block has " + std::to_string(nthreads) + " threads)");
        const Fiber& g = L.fibers[base + q];
        if (g.state == State::kExited)
          fail(at + " names lane " + std::to_string(q) + ", which has exited");
        if (g.state == State::kAtBarrier)
          fail(at + " names lane " + std::to_string(q) + ", which waits at __syncthreads instead");
        if (g.state != State::kAtWarp)
          fail("internal: lane " + std::to_string(q) + " neither arrived nor exited");
        if (g.op != f.op || g.mask != M)
          fail(at + " names lane " + std::to_string(q) + ", which sits at a different collective: " +
               op_name(g.op) + "(mask " + hex(g.mask) + ")");
      }
      for (int q = 0; q < 32; ++q) {
        if (!((M >> q) & 1u)) continue;
        Fiber& g = L.fibers[base + q];
        const int wd = g.width;
        const int seg = q & ~(wd - 1);
        int src = q;
        uint64_t r = 0;
        switch (g.op) {
          case Op::kSyncWarp: break;
          case Op::kShfl: src = seg + (((g.arg % wd) + wd) % wd); break;
          case Op::kShflXor: src = q ^ g.arg; if (src >= seg + wd || src < 0) src = q; break;
          case Op::kShflDown: src = q + g.arg; if (src >= seg + wd) src = q; break;
          case Op::kShflUp: src = q - g.arg; if (src < seg) src = q; break;
          case Op::kAny:
          case Op::kAll:
          case Op::kBallot: {
            unsigned any = 0, all = 1, ballot = 0;
            for (int p = 0; p < 32; ++p)
              if ((M >> p) & 1u) {
                const unsigned v = L.fibers[base + p].bits != 0;
                any |= v;
                all &= v;
                ballot |= v << p;
              }
            r = g.op == Op::kAny ? any : (g.op == Op::kAll ? all : ballot);
            break;
          }
        }
        if (g.op == Op::kShfl || g.op == Op::kShflXor || g.op == Op::kShflDown || g.op == Op::kShflUp) {
          if (src < 0 || src >= 32 || !((M >> src) & 1u)) {
            g_cur = &g;
            fail(std::string(op_name(g.op)) + " on lane " + std::to_string(q) + " reads lane " + std::to_string(src) +
                 ", which is not in its mask " + hex(M));
          }
          r = L.fibers[base + src].bits;
        }
        g.result = r;
      }
      for (int q = 0; q < 32; ++q)
        if ((M >> q) & 1u) L.fibers[base + q].state = State::kRunnable;
      done |= M;
      progress = true;
    }
  }
  g_cur = nullptr;
  return progress;
}

static void run_block(Launch& L, int nthreads, std::mt19937_64& rng) {
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = L.fibers[t];
    f = Fiber{};
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t % L.block.x), static_cast<unsigned>((t / L.block.x) % L.block.y),
                  static_cast<unsigned>(t / (L.block.x * L.block.y))};
    f.stack = stack_at(static_cast<size_t>(t));
    f.stack_size = kStackBytes;
    ctx_make(&f.ctx, f.stack, f.stack_size, &fiber_main, &f);
  }
  std::vector<int> order;
  order.reserve(nthreads);
  const Order mode = config().order;
  for (;;) {
    order.clear();
    for (int t = 0; t < nthreads; ++t)
      if (L.fibers[t].state == State::kRunnable) order.push_back(t);
    if (mode == Order::kReverse) std::reverse(order.begin(), order.end());
    if (mode == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      resume(&L.fibers[t]);
      if (L.error) std::rethrow_exception(L.error);
    }
    int exited = 0, barrier = 0, warp = 0;
    for (int t = 0; t < nthreads; ++t) {
      const State s = L.fibers[t].state;
      exited += s == State::kExited;
      barrier += s == State::kAtBarrier;
      warp += s == State::kAtWarp;
    }
    if (exited == nthreads) return;
    if (warp > 0 && resolve_warps(L, nthreads)) continue;
    if (barrier == nthreads) {
      for (int t = 0; t < nthreads; ++t) L.fibers[t].state = State::kRunnable;
      continue;
    }
    if (barrier > 0 && exited > 0)
      fail("__syncthreads reached by " + std::to_string(barrier) + " threads while " + std::to_string(exited) +
           " threads of the block have exited (undefined behaviour in CUDA)");
    fail("deadlock: " + std::to_string(barrier) + " threads at __syncthreads, " + std::to_string(warp) +
         " at warp collectives, " + std::to_string(exited) + " exited, none can proceed");
  }
}

static std::map<const void*, size_t>& smem_opt_in() {
  static std::map<const void*, size_t> m;
  return m;
}

void set_max_dynamic_smem(const void* fn, size_t bytes) {
  if (bytes > kMaxDynamicSmemOptIn)
    throw std::runtime_error("simt: cudaFuncSetAttribute: " + std::to_string(bytes) +
                             " bytes of dynamic shared memory exceed sm_90's " + std::to_string(kMaxDynamicSmemOptIn));
  smem_opt_in()[fn] = bytes;
}

void run_grid(const char* kernel, const void* fn, dim3 grid, dim3 block, size_t smem, Body body) {
  static std::mutex mu;  // one launch at a time: static __shared__ is one copy
  std::lock_guard<std::mutex> lock(mu);
  auto refuse = [&](const std::string& rule) {
    throw std::runtime_error(std::string("simt: kernel `") + kernel + "` refused at launch: " + rule);
  };
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  auto d = [](dim3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) refuse("grid " + d(grid) + " has a zero dimension");
  if (nthreads == 0) refuse("block " + d(block) + " has a zero dimension");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    refuse("grid " + d(grid) + " exceeds sm_90's limits (x <= 2^31-1, y and z <= 65535)");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u || nthreads > 1024u)
    refuse("block " + d(block) + " exceeds sm_90's limits (at most 1024 threads; x, y <= 1024, z <= 64)");
  size_t limit = kMaxDynamicSmemDefault;
  auto it = smem_opt_in().find(fn);
  if (it != smem_opt_in().end()) limit = it->second;
  if (smem > limit)
    refuse(std::to_string(smem) + " bytes of dynamic shared memory exceed the " + std::to_string(limit) +
           "-byte limit" + (limit == kMaxDynamicSmemDefault
                                ? " (more needs cudaFuncSetAttribute(..., cudaFuncAttributeMaxDynamicSharedMemorySize))"
                                : " set with cudaFuncSetAttribute"));

  Launch L;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.body = body;
  L.fibers.resize(nthreads);
  g_launch = &L;
  g_grid_dim = grid;
  g_block_dim = block;
  struct Reset {
    ~Reset() {
      std::free(g_launch->smem_buf);
      g_launch = nullptr;
      g_cur = nullptr;
    }
  } reset;
  ++stats().launches;
  const Config cfg = config();
  std::mt19937_64 rng(cfg.seed * 0x9E3779B97F4A7C15ull + config().launch_index++);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        std::free(L.smem_buf);
        L.smem_buf = nullptr;
        if (smem > 0) {
          L.smem_buf = std::malloc(smem);
          if (!L.smem_buf) refuse("cannot allocate dynamic shared memory");
          std::memset(L.smem_buf, 0xFF, smem);  // NaN for floats: a read before a write shows
        }
        run_block(L, static_cast<int>(nthreads), rng);
        ++stats().blocks;
        stats().threads += static_cast<int64_t>(nthreads);
      }
}

}  // namespace detail
}  // namespace simt

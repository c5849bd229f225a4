// 3D convolution (forward, input gradient, kernel gradient) on oneDNN, as XLA FFI handlers.
//
// XLA:CPU runs 3D convolutions through slow generic code and 2D ones 1.6-2.4x slower than
// oneDNN's conv3d (benchmarks/README.md). These handlers hand DSAN's channels-last 3D
// convolutions to oneDNN instead; dsan_jax/kernels/onednn/builder.py compiles this file (an explicit step),
// registers the handlers and gives them a JAX VJP.
//
// Layouts (JAX's): x, y [N, D, H, W, C] (oneDNN "ndhwc"); kernel [kd, kh, kw, C, O] ("dhwio").
// Attributes: strides, pad_lo, pad_hi: int64[3] over (D, H, W). fp32 only.
//
// oneDNN picks its own kernel layout ("any"); the kernel (and its gradient) are reordered from and
// to "dhwio" on each call. Activations stay channels-last, which oneDNN's AVX2/AVX-512 kernels read
// directly. Primitives are cached per shape and attribute set (creating one costs ~1 ms of JIT),
// and so are the buffers they need (see Workspace).

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;
using prop = dnnl::prop_kind;
// Every operand is a rank-5 float32 array; XLA's FFI rejects anything else before the handler runs.
using Tensor = ffi::Buffer<ffi::F32, 5>;
using ResultTensor = ffi::ResultBuffer<ffi::F32, 5>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// JAX shapes -> oneDNN logical dims: data [N, C, D, H, W], weights [O, I, D, H, W].
dims DataDims(ffi::Span<const int64_t> s) { return {s[0], s[4], s[1], s[2], s[3]}; }
dims WeightDims(ffi::Span<const int64_t> s) { return {s[4], s[3], s[0], s[1], s[2]}; }
dims ToDims(ffi::Span<const int64_t> s) { return dims(s.begin(), s.end()); }

struct ConvKey {
  std::string text;
  ConvKey(const char* kind, const dims& src, const dims& wei, const dims& dst, const dims& st,
          const dims& lo, const dims& hi) {
    std::ostringstream os;
    os << kind;
    for (const dims* d : {&src, &wei, &dst, &st, &lo, &hi}) {
      os << '|';
      for (auto v : *d) os << v << ',';
    }
    text = os.str();
  }
};

// One argument of a primitive as JAX holds it (`user`, channels-last / "dhwio") and as the
// primitive wants it (`prim`); when they differ, `reorder` converts on the way in or out.
struct Arg {
  int id;  // DNNL_ARG_*.
  bool output;
  dnnl::memory::desc user, prim;
  bool reorder = false;
  dnnl::reorder reorder_prim;
};

std::atomic<int64_t> workspace_bytes{0};  // Held by all plans' pools (XLA does not see them).

// Buffers for one execution of a plan: the primitive-layout copies of reordered arguments and
// oneDNN's scratchpad. Allocating them on every call (with fresh pages to fault in) cost more
// than some convolutions and made timings depend on the allocator's state, so they are kept.
struct Workspace {
  dnnl::memory prim[3];
  dnnl::memory scratchpad;
};

// One cached oneDNN setup: the compute primitive, its three tensor arguments, and a pool of
// workspaces (one per concurrent caller; with the lock in Run that is one).
struct Plan {
  dnnl::primitive compute;
  Arg args[3];  // Activation in, weights, activation out (order of the FFI buffers below).
  dnnl::memory::desc scratchpad_md;
  std::mutex pool_mutex;
  std::vector<std::unique_ptr<Workspace>> pool;

  std::unique_ptr<Workspace> Acquire() {
    {
      std::lock_guard<std::mutex> lock(pool_mutex);
      if (!pool.empty()) {
        auto ws = std::move(pool.back());
        pool.pop_back();
        return ws;
      }
    }
    auto ws = std::make_unique<Workspace>();
    size_t bytes = scratchpad_md.get_size();
    for (int i = 0; i < 3; ++i) {
      if (args[i].reorder) {
        ws->prim[i] = dnnl::memory(args[i].prim, Engine());
        bytes += args[i].prim.get_size();
      }
    }
    ws->scratchpad = dnnl::memory(scratchpad_md, Engine());
    workspace_bytes += bytes;
    return ws;
  }

  void Release(std::unique_ptr<Workspace> ws) {
    std::lock_guard<std::mutex> lock(pool_mutex);
    pool.push_back(std::move(ws));
  }
};

Arg MakeArg(int id, bool output, const dnnl::memory::desc& user,
            const dnnl::memory::desc& prim) {
  Arg arg{id, output, user, prim};
  arg.reorder = user != prim;
  if (arg.reorder) {
    dnnl::memory u(user, Engine(), nullptr), p(prim, Engine(), nullptr);
    arg.reorder_prim = output ? dnnl::reorder(p, u) : dnnl::reorder(u, p);
  }
  return arg;
}

// A plan's primitive, scratchpad and its three FFI buffers (activation in, weights, activation
// out), each with the reorder between the user's layout and the one the primitive chose
// (``exec_arg_md``: the primitive's memory descriptor of that execution argument).
template <typename Primitive>
void SetPlan(Plan* plan, const typename Primitive::primitive_desc& pd, const int (&ids)[3],
             const dnnl::memory::desc* const (&user)[3]) {
  plan->compute = Primitive(pd);
  plan->scratchpad_md = pd.scratchpad_desc();
  for (int i = 0; i < 3; ++i) {
    plan->args[i] = MakeArg(ids[i], i == 2, *user[i],
                            pd.query_md(dnnl::query::exec_arg_md, ids[i]));
  }
}

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Plan>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Plan>>();
  return *cache;
}

// User-managed scratchpads, so that each plan's cached Workspace owns its own.
dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Activations stay channels-last ("ndhwc"): oneDNN's brgemm kernels read them directly. Letting it
// pick its blocked layout ("nCdhw16c", as PyTorch does) made the convolutions ~5 % faster but
// the reorders in and out cost more (DSAN train step at 48x96x96: 756 vs 722 ms).
constexpr tag kActivations = tag::ndhwc;

dnnl::convolution_forward::primitive_desc ForwardPd(const dims& src, const dims& wei,
                                                    const dims& dst, const dims& st,
                                                    const dims& lo, const dims& hi) {
  dnnl::memory::desc src_md(src, dt::f32, kActivations);
  dnnl::memory::desc wei_md(wei, dt::f32, tag::any);
  dnnl::memory::desc dst_md(dst, dt::f32, kActivations);
  return dnnl::convolution_forward::primitive_desc(
      Engine(), prop::forward_training, dnnl::algorithm::convolution_direct, src_md, wei_md,
      dst_md, st, lo, hi, Attr());
}

enum class Kind { kForward, kBackwardData, kBackwardWeights };

std::shared_ptr<Plan> GetPlan(Kind kind, const dims& src, const dims& wei, const dims& dst,
                              const dims& st, const dims& lo, const dims& hi) {
  static const char* names[] = {"fwd", "bwd_data", "bwd_weights"};
  ConvKey key(names[static_cast<int>(kind)], src, wei, dst, st, lo, hi);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = Cache().find(key.text);
    if (it != Cache().end()) return it->second;
  }
  auto plan = std::make_shared<Plan>();
  const dnnl::memory::desc user_src(src, dt::f32, tag::ndhwc), user_dst(dst, dt::f32, tag::ndhwc);
  const dnnl::memory::desc user_wei(wei, dt::f32, tag::dhwio);
  const dnnl::memory::desc any_wei(wei, dt::f32, tag::any);
  auto fwd_pd = ForwardPd(src, wei, dst, st, lo, hi);
  if (kind == Kind::kForward) {
    SetPlan<dnnl::convolution_forward>(plan.get(), fwd_pd,
                                       {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
                                       {&user_src, &user_wei, &user_dst});
  } else if (kind == Kind::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, user_src, any_wei, user_dst, st, lo, hi,
        fwd_pd, Attr());
    SetPlan<dnnl::convolution_backward_data>(
        plan.get(), pd, {DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC},
        {&user_dst, &user_wei, &user_src});
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, user_src, any_wei, user_dst, st, lo, hi,
        fwd_pd, Attr());
    SetPlan<dnnl::convolution_backward_weights>(
        plan.get(), pd, {DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS},
        {&user_src, &user_dst, &user_wei});
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  Cache().emplace(key.text, plan);
  return plan;
}

ffi::Error CheckAttrs(ffi::Span<const int64_t> st, ffi::Span<const int64_t> lo,
                      ffi::Span<const int64_t> hi) {
  if (st.size() != 3 || lo.size() != 3 || hi.size() != 3) {
    return ffi::Error::InvalidArgument("strides, pad_lo and pad_hi must have 3 entries");
  }
  return ffi::Error::Success();
}

// Runs a plan on the three FFI buffers, in the order of `Plan::args`.
// One oneDNN call at a time. XLA runs independent thunks on several threads, and every oneDNN
// call starts an OpenMP team as wide as the machine, so two at once would run twice as many
// threads as cores (DSAN train step at 48x96x96 on 2 cores: 554-559 ms with this lock, 554-557 ms
// without: no cost here; on wide machines oversubscription would cost more).
std::mutex exec_mutex;

ffi::Error Run(Plan& plan, void* in0, void* in1, void* out) {
  std::unique_ptr<Workspace> ws;
  std::lock_guard<std::mutex> one_at_a_time(exec_mutex);
  try {
    ws = plan.Acquire();
    dnnl::stream stream(Engine());
    void* buffers[3] = {in0, in1, out};
    std::unordered_map<int, dnnl::memory> exec_args;
    dnnl::memory user_mem[3], prim_mem[3];
    for (int i = 0; i < 3; ++i) {
      const Arg& arg = plan.args[i];
      user_mem[i] = dnnl::memory(arg.user, Engine(), buffers[i]);
      prim_mem[i] = arg.reorder ? ws->prim[i] : user_mem[i];
      if (arg.reorder && !arg.output) arg.reorder_prim.execute(stream, user_mem[i], prim_mem[i]);
      exec_args[arg.id] = prim_mem[i];
    }
    exec_args[DNNL_ARG_SCRATCHPAD] = ws->scratchpad;
    plan.compute.execute(stream, exec_args);
    for (int i = 0; i < 3; ++i) {
      const Arg& arg = plan.args[i];
      if (arg.reorder && arg.output) arg.reorder_prim.execute(stream, prim_mem[i], user_mem[i]);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("oneDNN convolution: out of memory for its workspace");
  }
  plan.Release(std::move(ws));
  return ffi::Error::Success();
}

ffi::Error Forward(Tensor x, Tensor w, ResultTensor y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  if (auto err = CheckAttrs(strides, pad_lo, pad_hi); !err.success()) return err;
  std::shared_ptr<Plan> plan;
  try {
    plan = GetPlan(Kind::kForward, DataDims(x.dimensions()), WeightDims(w.dimensions()),
                   DataDims(y->dimensions()), ToDims(strides), ToDims(pad_lo), ToDims(pad_hi));
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN forward setup: ") + e.what());
  }
  return Run(*plan, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BackwardData(Tensor dy, Tensor w, ResultTensor dx, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  if (auto err = CheckAttrs(strides, pad_lo, pad_hi); !err.success()) return err;
  std::shared_ptr<Plan> plan;
  try {
    plan = GetPlan(Kind::kBackwardData, DataDims(dx->dimensions()), WeightDims(w.dimensions()),
                   DataDims(dy.dimensions()), ToDims(strides), ToDims(pad_lo), ToDims(pad_hi));
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN backward-data setup: ") + e.what());
  }
  return Run(*plan, dy.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error BackwardWeights(Tensor x, Tensor dy, ResultTensor dw,
                           ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  if (auto err = CheckAttrs(strides, pad_lo, pad_hi); !err.success()) return err;
  std::shared_ptr<Plan> plan;
  try {
    plan = GetPlan(Kind::kBackwardWeights, DataDims(x.dimensions()),
                   WeightDims(dw->dimensions()), DataDims(dy.dimensions()), ToDims(strides),
                   ToDims(pad_lo), ToDims(pad_hi));
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN backward-weights setup: ") + e.what());
  }
  return Run(*plan, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

}  // namespace

// Two float32 inputs, one float32 result, and the geometry.
#define DSAN_CONV_BINDING                        \
  ffi::Ffi::Bind()                               \
      .Arg<Tensor>()                             \
      .Arg<Tensor>()                             \
      .Ret<Tensor>()                             \
      .Attr<ffi::Span<const int64_t>>("strides") \
      .Attr<ffi::Span<const int64_t>>("pad_lo")  \
      .Attr<ffi::Span<const int64_t>>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsanConv3dForward, Forward, DSAN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsanConv3dBackwardData, BackwardData,
                              DSAN_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsanConv3dBackwardWeights, BackwardWeights,
                              DSAN_CONV_BINDING);

// The oneDNN version this library runs on (major * 10000 + minor * 100 + patch).
extern "C" int DsanOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

// Bytes of workspace (reordered kernels, scratchpads) the cached plans hold, outside XLA's memory.
extern "C" int64_t DsanOnednnWorkspaceBytes() { return workspace_bytes.load(); }

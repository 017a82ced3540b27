// Normalization kernels side by side, in one run: bnorm, a memcpy of the same bytes (the
// roofline), the same passes over the same bytes as plain loops (what reading and writing those
// tensors costs, with no per-channel work), a naive Eigen Tensor expression (what one writes by
// hand) and oneDNN's batch normalization when it was found at configure time (BNORM_HAVE_DNNL).
//
// Usage: bnorm_bench [--threads=1,4,8,16] [--cold] [--plans] [Google Benchmark's flags]. Every
// implementation runs at each thread count (default: 1 and every core the machine has), warm
// (calls back to back) or, with --cold, with the caches flushed before every timed call.
// --plans prints the machine's figures and bnorm's plan for every entry, and runs nothing.
//
// The rest of the family (LayerNorm, RMSNorm, GroupNorm, InstanceNorm2d) has entries of its own,
// against a memcpy and oneDNN's layer_normalization: see register_family.
//
// Names: <impl>/<pass>/<layout>/<shape>/t<threads>, pass in fwd_train, fwd_infer, bwd, and step
// (a training forward, then its backward), which bnorm runs through the functional layer and
// through a module that keeps no copy of its input (impl "module", Options::save_input = false).
// Rates are bytes moved per second: forward reads x and writes y (2 tensors), backward reads x
// and dy and writes dx (3 tensors), a step both, memcpy reads and writes one.
// benchmarks/compare.py turns a run into tables of ratios.

#include <benchmark/benchmark.h>

#include <bnorm/bnorm.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef BNORM_HAVE_DNNL
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace {

using Index = std::ptrdiff_t;
namespace fn = bnorm::functional;

struct Case {
  std::vector<Index> dims;  // PyTorch's channels-first dims
  Index batch() const { return dims[0]; }
  Index channels() const { return dims[1]; }
  Index spatial() const {
    Index s = 1;
    for (std::size_t i = 2; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
  Index size() const { return batch() * channels() * spatial(); }
  std::string name() const {
    std::string s;
    for (Index d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
    return s;
  }
};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {{32, 64, 112, 112}}, {{32, 64, 56, 56}},  {{32, 256, 56, 56}}, {{32, 128, 28, 28}},
      {{32, 512, 28, 28}},  {{32, 256, 14, 14}}, {{32, 1024, 14, 14}}, {{32, 512, 7, 7}},
      {{32, 2048, 7, 7}},   {{4096, 1024}},      {{256, 512}},         {{64, 128, 100}},
      {{128, 256, 25}},  // runs of one to three packets (see GroupCoefs, SelectCoefs)
      {{32, 1024, 3, 3}},  // runs shorter than a packet
      // Few channels, as an input layer has: channels-last rows shorter than a packet.
      {{256, 1, 32, 32}}, {{256, 3, 32, 32}}, {{256, 4, 32, 32}}, {{256, 6, 32, 32}},
      {{256, 8, 32, 32}}, {{256, 12, 32, 32}},
  };
  return all;
}

/// Tensors start on a page boundary, as large buffers in mappings of their own do, so that every
/// implementation meets the same placement at every repetition. Where two tensors lie relative
/// to each other modulo 4 KiB decides whether a load waits for a store to an address equal in
/// its low 12 bits (4K aliasing). Allocated one after another on the heap, an output lay 64 bytes
/// past its input modulo 4 KiB at some repetitions and not at others, as the heap's layout
/// changed: bnorm's inference on 32 x 2048 x 7 x 7 took 2x as long at those (before its forward
/// passes loaded ahead there), oneDNN's backward 1.1x.
template <class T>
struct PageAligned {
  static constexpr std::align_val_t kPage{4096};
  using value_type = T;
  PageAligned() = default;
  template <class U>
  PageAligned(const PageAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kPage)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kPage); }
  template <class U>
  bool operator==(const PageAligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const PageAligned<U>&) const { return false; }
};
using Buffer = std::vector<float, PageAligned<float>>;

/// Buffers of one case, filled once with data that has non-zero means.
struct Data {
  explicit Data(const Case& c)
      : x(std::size_t(c.size())), y(x.size()), dy(x.size()), dx(x.size()),
        weight(std::size_t(c.channels()), 1.5f), bias(weight.size(), 0.25f),
        mean(weight.size()), invstd(weight.size()), running_mean(weight.size(), 0.f),
        running_var(weight.size(), 1.f), grad_weight(weight.size()), grad_bias(weight.size()) {
    // A cheap generator: filling 100 MB tensors must not dominate the run.
    std::uint32_t state = 42;
    auto uniform = [&state] {
      state = state * 1664525u + 1013904223u;
      return float(state >> 8) * (1.f / 16777216.f);
    };
    for (auto& v : x) v = 3.f + 4.f * uniform();
    for (auto& v : dy) v = uniform() - 0.5f;
  }
  Buffer x, y, dy, dx;
  std::vector<float> weight, bias, mean, invstd, running_mean, running_var, grad_weight,
      grad_bias;
};

/// A thread pool per thread count, shared by every benchmark (one thread: the calling thread
/// alone, no pool).
const Eigen::ThreadPoolDevice* device(int threads) {
  struct Pool {
    explicit Pool(int n) : pool(n), device(&pool, n) {}
    Eigen::ThreadPool pool;
    Eigen::ThreadPoolDevice device;
  };
  static std::map<int, std::unique_ptr<Pool>> pools;
  if (threads <= 1) return nullptr;
  auto& p = pools[threads];
  if (!p) p = std::make_unique<Pool>(threads);
  return &p->device;
}

/// --cold: every timed call starts with its tensors out of the caches, as a layer's input is
/// where the layer before wrote it long ago. Without it, calls repeat back to back (warm: a
/// tensor that fits in the cache is read from there, as one the layer before just wrote).
bool& cold() {
  static bool on = false;
  return on;
}

/// In the cold regime, evicts every tensor from the caches, untimed: writes a buffer of twice
/// the last-level cache (and at least 64 MiB), a line at a time.
void cold_start(benchmark::State& state) {
  if (!cold()) return;
  state.PauseTiming();
  static std::vector<char> buffer(std::size_t(
      std::max<Index>(Index{64} << 20, 2 * bnorm::tuning().last_level_cache_bytes)));
  static char value = 0;
  ++value;
  for (std::size_t i = 0; i < buffer.size(); i += 64) buffer[i] = value;
  benchmark::ClobberMemory();
  state.ResumeTiming();
}

bool& plans_only() {
  static bool on = false;
  return on;
}

/// --plans: what bnorm decides for every entry on this machine.
void print_plans(const std::vector<int>& thread_counts) {
  const bnorm::Tuning& t = bnorm::tuning();
  std::printf("L1 %td KiB, L2 %td KiB per core, last level %td KiB shared by %td CPUs\n\n",
              t.l1_bytes >> 10, t.l2_bytes >> 10, t.last_level_cache_bytes >> 10,
              t.last_level_cpus);
  const std::pair<const char*, fn::Pass> passes[] = {
      {"fwd_train", fn::Pass::Training}, {"fwd_infer", fn::Pass::Inference},
      {"bwd", fn::Pass::Backward}};
  for (int threads : thread_counts)
    for (const Case& c : cases())
      for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast})
        for (const auto& [name, pass] : passes) {
          const fn::Shape shape{c.batch(), c.channels(), c.spatial(), layout};
          std::printf("bnorm/%s/%s/%s/t%d\n%s\n", name,
                      layout == bnorm::Layout::ChannelsFirst ? "NCHW" : "NHWC", c.name().c_str(),
                      threads, fn::describe_plan<float>(shape, pass, threads).c_str());
        }
}

/// This program's own flags, removed from argv before Google Benchmark reads it: --threads=1,4,8
/// (default: 1 and every core), --cold and --plans.
std::vector<int> own_flags(int& argc, char** argv) {
  std::vector<int> counts;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--cold") {
      cold() = true;
    } else if (arg == "--plans") {
      plans_only() = true;
    } else if (arg.rfind("--threads=", 0) == 0) {
      for (std::size_t at = 10; at < arg.size();) {
        const std::size_t comma = std::min(arg.find(',', at), arg.size());
        const int n = std::atoi(arg.substr(at, comma - at).c_str());
        if (n < 1) {
          std::fprintf(stderr, "bnorm_bench: --threads takes counts of at least 1, got %s\n",
                       arg.c_str());
          std::exit(1);
        }
        counts.push_back(n);
        at = comma + 1;
      }
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  if (counts.empty()) {
    counts.push_back(1);
    const int cores = int(std::thread::hardware_concurrency());
    if (cores > 1) counts.push_back(cores);
  }
  return counts;
}

void report(benchmark::State& state, const Case& c, int tensors) {
  state.SetBytesProcessed(int64_t(state.iterations()) * tensors * c.size() * int64_t(sizeof(float)));
}

void bnorm_bench(benchmark::State& state, const Case& c, bnorm::Layout layout,
                 const std::string& pass, int threads) {
  Data d(c);
  const fn::Shape shape{c.batch(), c.channels(), c.spatial(), layout};
  fn::Workspace<float> ws;
  const fn::Execution<float> ex{device(threads), &ws};
  fn::forward_training<float>(shape, d.x.data(), d.y.data(), 1e-5, {d.weight.data(), d.bias.data()},
                              {d.mean.data(), d.invstd.data()}, {}, ex);
  for (auto _ : state) {
    cold_start(state);
    if (pass == "fwd_train") {
      fn::forward_training<float>(shape, d.x.data(), d.y.data(), 1e-5,
                                  {d.weight.data(), d.bias.data()},
                                  {d.mean.data(), d.invstd.data()},
                                  {d.running_mean.data(), d.running_var.data(), 0.1}, ex);
    } else if (pass == "fwd_infer") {
      fn::forward_inference<float>(shape, d.x.data(), d.y.data(), 1e-5,
                                   {d.weight.data(), d.bias.data()}, d.running_mean.data(),
                                   d.running_var.data(), ex);
    } else {
      if (pass == "step")
        fn::forward_training<float>(shape, d.x.data(), d.y.data(), 1e-5,
                                    {d.weight.data(), d.bias.data()},
                                    {d.mean.data(), d.invstd.data()},
                                    {d.running_mean.data(), d.running_var.data(), 0.1}, ex);
      fn::backward<float>(shape, d.dy.data(), d.x.data(), d.dx.data(), fn::Statistics::Batch,
                          d.mean.data(), d.invstd.data(), d.weight.data(), d.grad_weight.data(),
                          d.grad_bias.data(), ex);
    }
    benchmark::ClobberMemory();
  }
  report(state, c, pass == "bwd" ? 3 : pass == "step" ? 5 : 2);
}

/// A pass on tensors stored as S (Eigen::bfloat16 or Eigen::half; parameters and statistics in
/// float), on bnorm_bench's data rounded to S: against bnorm_bench's float rows, the time of
/// moving half the bytes.
template <class S>
void storage_bench(benchmark::State& state, const Case& c, bnorm::Layout layout,
                   const std::string& pass, int threads) {
  using Narrow = std::vector<S, PageAligned<S>>;
  Data d(c);
  auto narrowed = [](const Buffer& v) {
    Narrow out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = S(v[i]);
    return out;
  };
  const Narrow x = narrowed(d.x), dy = narrowed(d.dy);
  Narrow y(x.size()), dx(x.size());
  const fn::Shape shape{c.batch(), c.channels(), c.spatial(), layout};
  fn::Workspace<float> ws;
  const fn::Execution<float> ex{device(threads), &ws};
  fn::forward_training<S>(shape, x.data(), y.data(), 1e-5, {d.weight.data(), d.bias.data()},
                          {d.mean.data(), d.invstd.data()}, {}, ex);
  for (auto _ : state) {
    cold_start(state);
    if (pass == "fwd_train")
      fn::forward_training<S>(shape, x.data(), y.data(), 1e-5, {d.weight.data(), d.bias.data()},
                              {d.mean.data(), d.invstd.data()},
                              {d.running_mean.data(), d.running_var.data(), 0.1}, ex);
    else if (pass == "fwd_infer")
      fn::forward_inference<S>(shape, x.data(), y.data(), 1e-5, {d.weight.data(), d.bias.data()},
                               d.running_mean.data(), d.running_var.data(), ex);
    else
      fn::backward<S>(shape, dy.data(), x.data(), dx.data(), fn::Statistics::Batch,
                      d.mean.data(), d.invstd.data(), d.weight.data(), d.grad_weight.data(),
                      d.grad_bias.data(), ex);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * (pass == "bwd" ? 3 : 2) * c.size() *
                          int64_t(sizeof(S)));
}

/// A training step through a module that keeps no copy of its input: forward(x, y), then
/// backward(x, dy, dx), on TensorMaps of the same buffers as bnorm_bench's.
template <int Rank>
void module_step(benchmark::State& state, const Case& c, bnorm::Layout layout, int threads) {
  using Module = std::conditional_t<Rank == 4, bnorm::BatchNorm2d<float>, bnorm::BatchNorm1d<float>>;
  using Map = Eigen::TensorMap<Eigen::Tensor<float, Rank, Eigen::RowMajor>>;
  Data d(c);
  Eigen::array<Index, Rank> dims;
  for (int i = 0; i < Rank; ++i)  // channels-last dims: N, spatial..., C
    dims[std::size_t(i)] = layout == bnorm::Layout::ChannelsFirst ? c.dims[std::size_t(i)]
                           : i == 0                               ? c.dims[0]
                           : i == Rank - 1                        ? c.dims[1]
                                                                  : c.dims[std::size_t(i + 1)];
  bnorm::Options opt;
  opt.layout = layout;
  opt.save_input = false;
  Module bn(c.channels(), opt);
  Map x(d.x.data(), dims), y(d.y.data(), dims), dy(d.dy.data(), dims), dx(d.dx.data(), dims);
  const Eigen::ThreadPoolDevice* dev = device(threads);
  for (auto _ : state) {
    cold_start(state);
    if (dev) {
      bn.forward(x, y, *dev);
      bn.backward(x, dy, dx, *dev);
    } else {
      bn.forward(x, y);
      bn.backward(x, dy, dx);
    }
    benchmark::ClobberMemory();
  }
  report(state, c, 5);
}

/// The fused epilogues against the unfused pair: the batch norm, then the residual add and ReLU
/// in an elementwise pass of their own (as a framework without fusion runs them). pass:
/// fwd_relu, fwd_add_relu (functional training forwards), or step_add_relu (a module's
/// forward_add + backward_add, against forward, the add + ReLU pass, ReLU's backward pass that
/// masks dy, and backward). z is dx's buffer in the forwards.
void fused_bench(benchmark::State& state, const Case& c, bnorm::Layout layout,
                 const std::string& pass, bool fused, int threads) {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<Tensor>;
  Data d(c);
  Buffer z(d.x.size()), dz(d.x.size());
  for (std::size_t i = 0; i < z.size(); ++i) z[i] = d.dy[i] * 4;
  const fn::Shape shape{c.batch(), c.channels(), c.spatial(), layout};
  fn::Workspace<float> ws;
  const Eigen::ThreadPoolDevice* dev = device(threads);
  const fn::Execution<float> ex{dev, &ws};
  const bool add = pass != "fwd_relu";
  float* y = d.y.data();
  const float* zp = z.data();
  auto epilogue = [&] {  // the unfused add + ReLU
    bnorm::detail::parallel_ranges(dev, c.size(), [&](Index i0, Index i1) {
      for (Index i = i0; i < i1; ++i) y[i] = std::max(y[i] + (add ? zp[i] : 0.f), 0.f);
    });
  };
  const bool last = layout == bnorm::Layout::ChannelsLast;
  const Eigen::DSizes<Index, 4> dims = last ? Eigen::DSizes<Index, 4>(c.dims[0], c.dims[2], c.dims[3], c.dims[1])
                                            : Eigen::DSizes<Index, 4>(c.dims[0], c.dims[1], c.dims[2], c.dims[3]);
  bnorm::Options opt;
  opt.layout = layout;
  opt.save_input = false;
  if (fused) opt.activation = bnorm::Activation::ReLU;
  bnorm::BatchNorm2d<float> bn(c.channels(), opt);
  Map xm(d.x.data(), dims), ym(d.y.data(), dims), zm(z.data(), dims), dym(d.dy.data(), dims),
      dxm(d.dx.data(), dims), dzm(dz.data(), dims);
  for (auto _ : state) {
    cold_start(state);
    if (pass != "step_add_relu") {
      fn::forward_training<float>(shape, d.x.data(), y, 1e-5, {d.weight.data(), d.bias.data()},
                                  {d.mean.data(), d.invstd.data()},
                                  {d.running_mean.data(), d.running_var.data(), 0.1}, ex,
                                  {fused && add ? zp : nullptr, fused});
      if (!fused) epilogue();
    } else if (fused) {
      if (dev) {
        bn.forward_add(xm, zm, ym, *dev);
        bn.backward_add(xm, dym, dxm, dzm, *dev);
      } else {
        bn.forward_add(xm, zm, ym);
        bn.backward_add(xm, dym, dxm, dzm);
      }
    } else {
      if (dev) bn.forward(xm, ym, *dev);
      else bn.forward(xm, ym);
      epilogue();
      bnorm::detail::parallel_ranges(dev, c.size(), [&](Index i0, Index i1) {
        for (Index i = i0; i < i1; ++i) dz[std::size_t(i)] = y[i] > 0 ? d.dy[std::size_t(i)] : 0.f;
      });
      if (dev) bn.backward(xm, dzm, dxm, *dev);
      else bn.backward(xm, dzm, dxm);
    }
    benchmark::ClobberMemory();
  }
  // Tensors the fused pass moves: x, z, y; the step: also dy, dx, dz and x twice more.
  report(state, c, pass == "fwd_relu" ? 2 : pass == "fwd_add_relu" ? 3 : 9);
}

void memcpy_bench(benchmark::State& state, const Case& c, int threads) {
  Data d(c);
  for (auto _ : state) {
    cold_start(state);
    // Split as bnorm's kernels split their work, by the same function: the roofline pays what
    // bnorm pays to wake its worker and wait for it.
    bnorm::detail::parallel_ranges(device(threads), Index(d.x.size()), [&](Index begin, Index end) {
      std::memcpy(d.y.data() + begin, d.x.data() + begin, std::size_t(end - begin) * sizeof(float));
    });
    benchmark::ClobberMemory();
  }
  report(state, c, 2);
}

/// out[i] = a * u[i] + b * v[i] (v == nullptr: a * u[i] + b), stored past the cache.
void streamed_pass(float* out, const float* u, const float* v, float a, float b, Index n) {
  namespace bd = bnorm::detail;
  using P = bd::Packet<float>;
  const P pa = Eigen::internal::pset1<P>(a), pb = Eigen::internal::pset1<P>(b);
  Index i = 0;
  for (; i + bd::kLanes<float> <= n; i += bd::kLanes<float>) {  // buffers start on a page
    const P uu = Eigen::internal::pload<P>(u + i);
    const P vv = v ? Eigen::internal::pload<P>(v + i) : Eigen::internal::pset1<P>(1.f);
    bd::stream_store(out + i, Eigen::internal::pmadd(uu, pa, Eigen::internal::pmul(vv, pb)));
  }
  bd::stream_fence();
  for (; i < n; ++i) out[i] = u[i] * a + (v ? v[i] : 1.f) * b;
}

/// The passes of `pass` over the same bytes as plain loops, with one scale and shift for the
/// whole tensor instead of per-channel work: a sum of x (training), or of dy * x (backward), then
/// y = x * a + b, or dx = dy * a + x * b. What reading and writing those tensors costs at the
/// least on one thread, with bnorm's choice of stores: past the cache for outputs of 8 MiB and
/// more (Tuning::stream_bytes) where a packet of float fills a cache line (Tuning::line_bytes),
/// ordinary ones elsewhere. (The loops read their inputs from memory twice
/// where they exceed the cache; bnorm reads channels-first data in groups whose second read
/// comes from cache.)
void loops_bench(benchmark::State& state, const Case& c, const std::string& pass) {
  Data d(c);
  const Eigen::Map<const Eigen::ArrayXf> x(d.x.data(), c.size()), dy(d.dy.data(), c.size());
  Eigen::Map<Eigen::ArrayXf> y(d.y.data(), c.size()), dx(d.dx.data(), c.size());
  const bool stream = c.size() * Index(sizeof(float)) >= bnorm::tuning().stream_bytes &&
                      bnorm::detail::kPacketBytes<float> >= bnorm::tuning().line_bytes;
  for (auto _ : state) {
    cold_start(state);
    float sum = 0;
    if (pass == "fwd_train") sum = x.sum();
    if (pass == "bwd") sum = (dy * x).sum();
    benchmark::DoNotOptimize(sum);
    if (pass == "bwd") {
      if (stream) streamed_pass(d.dx.data(), d.dy.data(), d.x.data(), 1.5f, 0.25f, c.size());
      else dx = dy * 1.5f + x * 0.25f;
    } else {
      if (stream) streamed_pass(d.y.data(), d.x.data(), nullptr, 1.5f, 0.25f, c.size());
      else y = x * 1.5f + 0.25f;
    }
    benchmark::ClobberMemory();
  }
  report(state, c, pass == "bwd" ? 3 : 2);
}

/// What a user writes by hand with Eigen Tensor expressions (training forward, 1 thread).
template <int Rank>
void naive_eigen(benchmark::State& state, const Case& c, bnorm::Layout layout) {
  Data d(c);
  using Tensor = Eigen::Tensor<float, Rank, Eigen::RowMajor>;
  Eigen::array<Index, Rank> dims, keep, grow;
  const int cdim = layout == bnorm::Layout::ChannelsFirst ? 1 : Rank - 1;
  Eigen::array<Index, Rank - 1> reduce;
  for (int i = 0, r = 0; i < Rank; ++i) {
    // channels-last dims: N, spatial..., C
    const Index size = layout == bnorm::Layout::ChannelsFirst ? c.dims[std::size_t(i)]
                       : i == 0                               ? c.dims[0]
                       : i == Rank - 1                        ? c.dims[1]
                                                              : c.dims[std::size_t(i + 1)];
    dims[std::size_t(i)] = size;
    keep[std::size_t(i)] = i == cdim ? size : 1;
    grow[std::size_t(i)] = i == cdim ? 1 : size;
    if (i != cdim) reduce[std::size_t(r++)] = i;
  }
  Eigen::TensorMap<const Tensor> x(d.x.data(), dims);
  Eigen::TensorMap<Tensor> y(d.y.data(), dims);
  Eigen::TensorMap<const Eigen::Tensor<float, 1, Eigen::RowMajor>> w(d.weight.data(), c.channels()),
      b(d.bias.data(), c.channels());
  for (auto _ : state) {
    cold_start(state);
    const Eigen::Tensor<float, 1, Eigen::RowMajor> mean = x.mean(reduce);
    const auto centered = x - mean.reshape(keep).broadcast(grow);
    const Eigen::Tensor<float, 1, Eigen::RowMajor> var = centered.square().mean(reduce);
    const Eigen::Tensor<float, 1, Eigen::RowMajor> scale = w * (var + 1e-5f).rsqrt();
    y = centered * scale.reshape(keep).broadcast(grow) + b.reshape(keep).broadcast(grow);
    benchmark::ClobberMemory();
  }
  report(state, c, 2);
}

#ifdef BNORM_HAVE_DNNL
void dnnl_bench(benchmark::State& state, const Case& c, const std::string& layout,
                const std::string& pass, int threads) {
  using namespace dnnl;
  using tag = memory::format_tag;
  omp_set_num_threads(threads);
  const engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  memory::dims dims(c.dims.begin(), c.dims.end());
  // oneDNN 2.6 has fast kernels for 4D data only: (N, C) and (N, C, L) run as the same bytes
  // seen as (N, C, 1, 1) and (N, C, L, 1), which is how a user would reach them.
  if (layout != "NCHW" || dims.size() == 3) dims.resize(4, 1);
  const std::size_t rank = dims.size();
  tag t = tag::undef;
  if (layout == "NCHW") t = rank == 2 ? tag::nc : rank == 3 ? tag::ncw : tag::nchw;
  if (layout == "NHWC") t = rank == 2 ? tag::nc : rank == 3 ? tag::nwc : tag::nhwc;
  if (layout == "nChw16c") t = rank == 3 ? tag::nCw16c : tag::nChw16c;
  const memory::desc md(dims, memory::data_type::f32, t);
  const auto flags = normalization_flags::use_scale_shift;
  Data d(c);
  std::vector<float> scale_shift(std::size_t(2 * c.channels()), 1.f);
  memory src(md, eng, d.x.data()), dst(md, eng, d.y.data()), diff_dst(md, eng, d.dy.data()),
      diff_src(md, eng, d.dx.data());
  const batch_normalization_forward::primitive_desc train_pd(
      {prop_kind::forward_training, md, 1e-5f, flags}, eng);
  memory mean(train_pd.mean_desc(), eng, d.mean.data()),
      var(train_pd.variance_desc(), eng, d.invstd.data()),
      ss(train_pd.weights_desc(), eng, scale_shift.data());
  std::vector<float> diff_ss_data(scale_shift.size());
  memory diff_ss(train_pd.weights_desc(), eng, diff_ss_data.data());
  const batch_normalization_forward train(train_pd);
  const std::unordered_map<int, memory> train_args = {
      {DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, mean},
      {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_SCALE_SHIFT, ss}};
  train.execute(strm, train_args);
  strm.wait();

  std::function<void()> run;
  primitive prim;
  std::unordered_map<int, memory> args;
  if (pass == "fwd_train") {
    prim = train;
    args = train_args;
  } else if (pass == "fwd_infer") {
    prim = batch_normalization_forward(batch_normalization_forward::primitive_desc(
        {prop_kind::forward_inference, md, 1e-5f, flags | normalization_flags::use_global_stats},
        eng));
    args = train_args;
  } else {
    prim = batch_normalization_backward(batch_normalization_backward::primitive_desc(
        {prop_kind::backward, md, md, 1e-5f, flags}, eng, train_pd));
    args = {{DNNL_ARG_SRC, src},           {DNNL_ARG_MEAN, mean},
            {DNNL_ARG_VARIANCE, var},      {DNNL_ARG_DIFF_DST, diff_dst},
            {DNNL_ARG_SCALE_SHIFT, ss},    {DNNL_ARG_DIFF_SRC, diff_src},
            {DNNL_ARG_DIFF_SCALE_SHIFT, diff_ss}};
  }
  for (auto _ : state) {
    cold_start(state);
    prim.execute(strm, args);
    strm.wait();
  }
  report(state, c, pass == "bwd" ? 3 : 2);
}
#endif

// --- The rest of the family: LayerNorm and RMSNorm on transformer rows, GroupNorm (32 groups)
// and InstanceNorm2d on images. Passes <norm>_fwd (a training forward, which keeps its
// statistics) and <norm>_bwd (dx and the parameter gradients); layout "-" for rows.

struct FamilyCase {
  std::string norm;         // layernorm, rmsnorm, groupnorm, instancenorm
  std::vector<Index> dims;  // PyTorch's dims (channels-first for images)
  Index size() const {
    Index s = 1;
    for (Index d : dims) s *= d;
    return s;
  }
  Index width() const { return dims.back(); }  // rows: the normalized dim
  Index rows() const { return size() / width(); }
  Index channels() const { return dims[1]; }
  Index groups() const { return norm == "groupnorm" ? 32 : channels(); }
  bool images() const { return norm == "groupnorm" || norm == "instancenorm"; }
  fn::Shape shape(bnorm::Layout layout) const {
    return {dims[0], channels(), size() / (dims[0] * channels()), layout};
  }
  std::string name() const {
    std::string s;
    for (Index d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
    return s;
  }
};

const std::vector<FamilyCase>& family_cases() {
  static const std::vector<FamilyCase> all = [] {
    std::vector<FamilyCase> v;
    for (const char* norm : {"layernorm", "rmsnorm"})
      for (std::vector<Index> dims : {std::vector<Index>{8192, 768}, std::vector<Index>{8192, 4096},
                                      std::vector<Index>{16384, 1024},
                                      std::vector<Index>{64, 197, 768}})
        v.push_back({norm, dims});
    for (std::vector<Index> dims : {std::vector<Index>{16, 256, 64, 64},
                                    std::vector<Index>{8, 512, 32, 32},
                                    std::vector<Index>{32, 128, 56, 56}})
      v.push_back({"groupnorm", dims});
    v.push_back({"instancenorm", {16, 64, 128, 128}});
    return v;
  }();
  return all;
}

/// Buffers of a family case: per-position or per-channel parameters, statistics per row or per
/// sample and group.
struct FamilyData {
  explicit FamilyData(const FamilyCase& c)
      : x(std::size_t(c.size())), y(x.size()), dy(x.size()), dx(x.size()),
        weight(std::size_t(c.images() ? c.channels() : c.width()), 1.5f), bias(weight.size(), 0.25f),
        grad_weight(weight.size()), grad_bias(weight.size()),
        mean(std::size_t(c.images() ? c.dims[0] * c.groups() : c.rows())), invstd(mean.size()) {
    std::uint32_t state = 7;
    auto uniform = [&state] {
      state = state * 1664525u + 1013904223u;
      return float(state >> 8) * (1.f / 16777216.f);
    };
    for (auto& v : x) v = 3.f + 4.f * uniform();
    for (auto& v : dy) v = uniform() - 0.5f;
  }
  Buffer x, y, dy, dx;
  std::vector<float> weight, bias, grad_weight, grad_bias, mean, invstd;
};

void family_bench(benchmark::State& state, const FamilyCase& c, bnorm::Layout layout,
                  bool backward, int threads) {
  FamilyData d(c);
  fn::Workspace<float> ws;
  const fn::Execution<float> ex{device(threads), &ws};
  const Index rows = c.rows(), width = c.width();
  const fn::Shape shape = c.shape(layout);
  auto forward = [&] {
    if (c.norm == "layernorm")
      fn::layer_norm_forward<float>(rows, width, d.x.data(), d.y.data(), 1e-5,
                                    {d.weight.data(), d.bias.data()},
                                    {d.mean.data(), d.invstd.data()}, ex);
    else if (c.norm == "rmsnorm")
      fn::rms_norm_forward<float>(rows, width, d.x.data(), d.y.data(), 1e-6, d.weight.data(),
                                  d.invstd.data(), ex);
    else
      fn::group_norm_forward<float>(shape, c.groups(), d.x.data(), d.y.data(), 1e-5,
                                    {d.weight.data(), d.bias.data()},
                                    {d.mean.data(), d.invstd.data()}, ex);
  };
  auto gradients = [&] {
    if (c.norm == "layernorm")
      fn::layer_norm_backward<float>(rows, width, d.dy.data(), d.x.data(), d.dx.data(),
                                     d.mean.data(), d.invstd.data(), d.weight.data(),
                                     d.grad_weight.data(), d.grad_bias.data(), ex);
    else if (c.norm == "rmsnorm")
      fn::rms_norm_backward<float>(rows, width, d.dy.data(), d.x.data(), d.dx.data(),
                                   d.invstd.data(), d.weight.data(), d.grad_weight.data(), ex);
    else
      fn::group_norm_backward<float>(shape, c.groups(), d.dy.data(), d.x.data(), d.dx.data(),
                                     d.mean.data(), d.invstd.data(), d.weight.data(),
                                     d.grad_weight.data(), d.grad_bias.data(), ex);
  };
  forward();
  for (auto _ : state) {
    cold_start(state);
    if (backward) gradients();
    else forward();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * (backward ? 3 : 2) * c.size() *
                          int64_t(sizeof(float)));
}

void family_memcpy(benchmark::State& state, const FamilyCase& c, int threads) {
  FamilyData d(c);
  for (auto _ : state) {
    cold_start(state);
    bnorm::detail::parallel_ranges(device(threads), Index(d.x.size()), [&](Index begin, Index end) {
      std::memcpy(d.y.data() + begin, d.x.data() + begin, std::size_t(end - begin) * sizeof(float));
    });
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 2 * c.size() * int64_t(sizeof(float)));
}

#ifdef BNORM_HAVE_DNNL
/// oneDNN's layer_normalization (its only member of the family in 2.6), with scale and shift.
void dnnl_layer_norm(benchmark::State& state, const FamilyCase& c, bool backward, int threads) {
  using namespace dnnl;
  omp_set_num_threads(threads);
  const engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  const memory::desc md({c.rows(), c.width()}, memory::data_type::f32, memory::format_tag::ab);
  const auto flags = normalization_flags::use_scale | normalization_flags::use_shift;
  FamilyData d(c);
  const layer_normalization_forward::primitive_desc fwd_pd(
      {prop_kind::forward_training, md, 1e-5f, flags}, eng);
  memory src(md, eng, d.x.data()), dst(md, eng, d.y.data()), diff_dst(md, eng, d.dy.data()),
      diff_src(md, eng, d.dx.data());
  memory mean(fwd_pd.mean_desc(), eng, d.mean.data()), var(fwd_pd.variance_desc(), eng, d.invstd.data());
  const memory::desc pd({c.width()}, memory::data_type::f32, memory::format_tag::a);
  memory scale(pd, eng, d.weight.data()), shift(pd, eng, d.bias.data()),
      diff_scale(pd, eng, d.grad_weight.data()), diff_shift(pd, eng, d.grad_bias.data());
  const layer_normalization_forward fwd(fwd_pd);
  const std::unordered_map<int, memory> fwd_args = {
      {DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var},
      {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}};
  fwd.execute(strm, fwd_args);
  strm.wait();
  primitive prim = fwd;
  std::unordered_map<int, memory> args = fwd_args;
  if (backward) {
    prim = layer_normalization_backward(layer_normalization_backward::primitive_desc(
        {prop_kind::backward, md, md, 1e-5f, flags}, eng, fwd_pd));
    args = {{DNNL_ARG_SRC, src},          {DNNL_ARG_MEAN, mean},
            {DNNL_ARG_VARIANCE, var},     {DNNL_ARG_DIFF_DST, diff_dst},
            {DNNL_ARG_SCALE, scale},      {DNNL_ARG_SHIFT, shift},
            {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_DIFF_SCALE, diff_scale},
            {DNNL_ARG_DIFF_SHIFT, diff_shift}};
  }
  for (auto _ : state) {
    cold_start(state);
    prim.execute(strm, args);
    strm.wait();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * (backward ? 3 : 2) * c.size() *
                          int64_t(sizeof(float)));
}
#endif

void register_family(const std::vector<int>& thread_counts) {
  for (const FamilyCase& c : family_cases()) {
    const std::string shape = c.name();
    for (int t : thread_counts) {
      const std::string threads = "/t" + std::to_string(t);
      // One memcpy per shape (LayerNorm and RMSNorm share theirs).
      if (c.norm != "rmsnorm")
        benchmark::RegisterBenchmark(("memcpy/copy/-/" + shape + threads).c_str(), family_memcpy, c, t);
      for (bool backward : {false, true}) {
        const std::string pass = c.norm + (backward ? "_bwd" : "_fwd");
        if (c.images()) {
          for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast})
            benchmark::RegisterBenchmark(
                ("bnorm/" + pass + "/" + (layout == bnorm::Layout::ChannelsFirst ? "NCHW" : "NHWC") +
                 "/" + shape + threads).c_str(),
                family_bench, c, layout, backward, t);
        } else {
          benchmark::RegisterBenchmark(("bnorm/" + pass + "/-/" + shape + threads).c_str(),
                                       family_bench, c, bnorm::Layout::ChannelsFirst, backward, t);
#ifdef BNORM_HAVE_DNNL
          if (c.norm == "layernorm")
            benchmark::RegisterBenchmark(("onednn/" + pass + "/-/" + shape + threads).c_str(),
                                         dnnl_layer_norm, c, backward, t);
#endif
        }
      }
    }
  }
}

void register_all(const std::vector<int>& thread_counts) {
  const char* passes[] = {"fwd_train", "fwd_infer", "bwd"};
  for (const Case& c : cases()) {
    const std::string shape = c.name();
    for (int t : thread_counts) {
      const std::string threads = "/t" + std::to_string(t);
      benchmark::RegisterBenchmark(("memcpy/copy/-/" + shape + threads).c_str(), memcpy_bench, c, t);
      if (t == 1)  // the table compares one thread's
        for (const char* pass : passes)
          benchmark::RegisterBenchmark(("loops/" + std::string(pass) + "/-/" + shape + threads).c_str(),
                                       loops_bench, c, std::string(pass));
      for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast}) {
        const std::string lname = layout == bnorm::Layout::ChannelsFirst ? "NCHW" : "NHWC";
        for (const char* pass : passes)
          benchmark::RegisterBenchmark(
              ("bnorm/" + std::string(pass) + "/" + lname + "/" + shape + threads).c_str(),
              bnorm_bench, c, layout, std::string(pass), t);
        // A training step, through the functional layer and through a module.
        const std::string step = "/step/" + lname + "/" + shape + threads;
        benchmark::RegisterBenchmark(("bnorm" + step).c_str(), bnorm_bench, c, layout,
                                     std::string("step"), t);
        if (c.dims.size() == 4)
          benchmark::RegisterBenchmark(("module" + step).c_str(), module_step<4>, c, layout, t);
        if (c.dims.size() == 3)
          benchmark::RegisterBenchmark(("module" + step).c_str(), module_step<3>, c, layout, t);
        if (c.dims.size() == 2)
          benchmark::RegisterBenchmark(("module" + step).c_str(), module_step<2>, c, layout, t);
        if (t == 1) {  // what one writes by hand runs on one thread
          const std::string name = "naive_eigen/fwd_train/" + lname + "/" + shape + threads;
          if (c.dims.size() == 2) benchmark::RegisterBenchmark(name.c_str(), naive_eigen<2>, c, layout);
          if (c.dims.size() == 3) benchmark::RegisterBenchmark(name.c_str(), naive_eigen<3>, c, layout);
          if (c.dims.size() == 4) benchmark::RegisterBenchmark(name.c_str(), naive_eigen<4>, c, layout);
        }
      }
      // The fused epilogues against the unfused pair, on three ResNet shapes.
      const std::string fused_shapes = " 32x64x56x56 32x256x14x14 32x2048x7x7 ";
      if (fused_shapes.find(" " + shape + " ") != std::string::npos)
        for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast})
          for (const char* pass : {"fwd_relu", "fwd_add_relu", "step_add_relu"})
            for (bool fused : {true, false}) {
              const std::string lname = layout == bnorm::Layout::ChannelsFirst ? "NCHW" : "NHWC";
              benchmark::RegisterBenchmark(((fused ? "fused/" : "unfused/") + std::string(pass) +
                                            "/" + lname + "/" + shape + threads).c_str(),
                                           fused_bench, c, layout, std::string(pass), fused, t);
            }
      // 16-bit storage against bnorm's float rows, on large shapes.
      const std::string storage_shapes = " 32x64x112x112 32x256x56x56 32x2048x7x7 4096x1024 ";
      if (storage_shapes.find(" " + shape + " ") != std::string::npos)
        for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast}) {
          if (c.dims.size() == 2 && layout == bnorm::Layout::ChannelsLast) continue;  // the same
          const std::string lname = layout == bnorm::Layout::ChannelsFirst ? "NCHW" : "NHWC";
          for (const char* pass : passes) {
            const std::string rest = "/" + std::string(pass) + "/" + lname + "/" + shape + threads;
            benchmark::RegisterBenchmark(("bf16" + rest).c_str(), storage_bench<Eigen::bfloat16>,
                                         c, layout, std::string(pass), t);
            benchmark::RegisterBenchmark(("fp16" + rest).c_str(), storage_bench<Eigen::half>, c,
                                         layout, std::string(pass), t);
          }
        }
#ifdef BNORM_HAVE_DNNL
      for (const char* layout : {"NCHW", "NHWC", "nChw16c"}) {
        if (c.dims.size() == 2 && std::string(layout) == "NHWC") continue;  // same as NCHW
        // The blocked layout pads channels to a multiple of 16: its tensors would not fit the
        // buffers (and would move up to 16x the bytes).
        if (std::string(layout) == "nChw16c" && c.channels() % 16 != 0) continue;
        for (const char* pass : passes)
          benchmark::RegisterBenchmark(("onednn/" + std::string(pass) + "/" + layout + "/" +
                                        shape + threads).c_str(),
                                       dnnl_bench, c, std::string(layout), std::string(pass), t);
      }
#endif
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  // OpenMP's threads (oneDNN's) wait for work passively, so that they do not spin on cores
  // while another implementation is timed (a user's setting wins).
  setenv("OMP_WAIT_POLICY", "passive", 0);
  const std::vector<int> thread_counts = own_flags(argc, argv);
  if (plans_only()) {
    print_plans(thread_counts);
    return 0;
  }
  register_all(thread_counts);
  register_family(thread_counts);
  benchmark::AddCustomContext("regime", cold() ? "cold" : "warm");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

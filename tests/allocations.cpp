// Steady-state calls allocate nothing when the output is the caller's: counts every operator
// new in the process around repeated forward / backward / infer calls, on the calling thread
// alone and on a thread pool, for both layouts.

#include <bnorm/instances.hpp>  // the kernels compiled once, in instances.cpp

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {
std::atomic<long> allocations{0};
}

// Every allocation of the process goes through malloc (operator new, std::vector, and Eigen's
// aligned allocations alike): count it there.
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);

void* malloc(std::size_t size) {
  ++allocations;
  return __libc_malloc(size);
}
void* calloc(std::size_t n, std::size_t size) {
  ++allocations;
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t size) {
  ++allocations;
  return __libc_realloc(p, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) {
  ++allocations;
  return __libc_memalign(alignment, size);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  ++allocations;
  *out = __libc_memalign(alignment, size);
  return *out ? 0 : 12;  // ENOMEM
}
}

namespace {

using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
using Map = Eigen::TensorMap<Tensor>;

/// Allocations made by `steps` calls of f after two warm-up calls.
template <class F>
long count(F&& f, int steps = 20) {
  f();
  f();
  const long before = allocations.load();
  for (int i = 0; i < steps; ++i) f();
  return allocations.load() - before;
}

/// One process alone: SyncBatchNorm's exchanges, with nothing to exchange with.
struct Solo : bnorm::Communicator {
  void allreduce_sum(double*, std::ptrdiff_t) override {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
};

int check(const std::string& what, long n) {
  std::printf("%-60s %ld allocations\n", what.c_str(), n);
  return n == 0 ? 0 : 1;
}

}  // namespace

int main() {
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  int failures = 0;
  for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast}) {
    const std::string name = layout == bnorm::Layout::ChannelsFirst ? "ChannelsFirst" : "ChannelsLast";
    bnorm::Options opt;
    opt.layout = layout;
    bnorm::BatchNorm2d<float> bn(16, opt);
    const bool last = layout == bnorm::Layout::ChannelsLast;
    Tensor x = last ? Tensor(8, 9, 7, 16) : Tensor(8, 16, 9, 7);
    x.setRandom();
    Tensor y(x.dimensions()), dx(x.dimensions());
    Map ym(y.data(), x.dimensions()), dxm(dx.data(), x.dimensions());
    failures += check(name + ": training forward + backward", count([&] {
                        bn.forward(x, ym);
                        bn.backward(x, dxm);
                      }));
    failures += check(name + ": training forward + backward, 2 threads", count([&] {
                        bn.forward(x, ym, device);
                        bn.backward(x, dxm, device);
                      }));
    bn.eval();
    failures += check(name + ": eval forward + backward, 2 threads", count([&] {
                        bn.forward(x, ym, device);
                        bn.backward(x, dxm, device);
                      }));
    failures += check(name + ": infer", count([&] { bn.infer(x, ym); }));
    opt.save_input = false;
    bnorm::BatchNorm2d<float> given(16, opt);
    failures += check(name + ": training step, input given to backward, 2 threads", count([&] {
                        given.forward(x, ym, device);
                        given.backward(x, x, dxm, device);
                      }));
    // The counter sees what it must: a forward that returns a new tensor allocates it. (Into a
    // tensor of its own: assigning to y would move the new storage into y and leave ym, which
    // the next check writes through, pointing at freed memory.)
    Tensor fresh;
    if (count([&] { fresh = bn.infer(x); }) == 0) failures += check("the allocation counter", -1);
    failures += check(name + ": infer, 2 threads", count([&] { bn.infer(x, ym, device); }));
    // The rest of the family, on the same tensor.
    bnorm::GroupNormOptions go;
    go.layout = layout;
    bnorm::GroupNorm<float> gn(4, 16, go);
    bnorm::InstanceNormOptions io;
    io.layout = layout;
    io.affine = io.track_running_stats = true;
    bnorm::InstanceNorm2d<float> in(16, io);
    bnorm::LayerNorm<float> ln({last ? bnorm::Index{7} : bnorm::Index{9}, last ? bnorm::Index{16} : bnorm::Index{7}});
    bnorm::RMSNorm<float> rms({last ? bnorm::Index{16} : bnorm::Index{7}});
    auto family = [&](auto& m, const std::string& what) {
      failures += check(name + ": " + what + " training forward + backward, 2 threads",
                        count([&] {
                          m.forward(x, ym, device);
                          m.backward(x, dxm, device);
                        }));
      failures += check(name + ": " + what + " infer, 2 threads",
                        count([&] { m.infer(x, ym, device); }));
    };
    Solo solo;
    bnorm::Options sync_opt;
    sync_opt.layout = layout;
    bnorm::SyncBatchNorm2d<float> sync(16, sync_opt, solo);
    failures += check(name + ": SyncBatchNorm2d training forward + backward, 2 threads",
                      count([&] {
                        sync.forward(x, ym, device);
                        sync.backward(x, dxm, device);
                      }));
    bnorm::Options fused_opt = sync_opt;
    fused_opt.activation = bnorm::Activation::ReLU;
    bnorm::BatchNorm2d<float> fused(16, fused_opt);
    Tensor z(x.dimensions()), dz(x.dimensions());
    z.setRandom();
    Map dzm(dz.data(), x.dimensions());
    failures += check(name + ": forward_add + backward_add with ReLU, 2 threads", count([&] {
                        fused.forward_add(x, z, ym, device);
                        fused.backward_add(x, dxm, dzm, device);
                      }));
    family(gn, "GroupNorm");
    family(in, "InstanceNorm2d");
    family(ln, "LayerNorm");
    family(rms, "RMSNorm");
  }
  {
    namespace fn = bnorm::functional;
    std::vector<float> x(4 * 16 * 63, 1.5f), y(x.size()), dx(x.size()), w(16 * 63, 1.f),
        mean(4 * 16), invstd(mean.size()), grad(w.size());
    x[5] = 3;
    const fn::Shape shape{4, 16, 63, bnorm::Layout::ChannelsFirst};
    const fn::Execution<float> ex{&device, nullptr};
    failures += check("functional GroupNorm forward + backward, 2 threads", count([&] {
      fn::group_norm_forward<float>(shape, 4, x.data(), y.data(), 1e-5, {w.data(), w.data()},
                                    {mean.data(), invstd.data()}, ex);
      fn::group_norm_backward<float>(shape, 4, y.data(), x.data(), dx.data(), mean.data(),
                                     invstd.data(), w.data(), grad.data(), grad.data(), ex);
    }));
    failures += check("functional LayerNorm forward + backward, 2 threads", count([&] {
      fn::layer_norm_forward<float>(64, 63, x.data(), y.data(), 1e-5, {w.data(), w.data()},
                                    {mean.data(), invstd.data()}, ex);
      fn::layer_norm_backward<float>(64, 63, y.data(), x.data(), dx.data(), mean.data(),
                                     invstd.data(), w.data(), grad.data(), nullptr, ex);
    }));
  }
  std::printf(failures == 0 ? "no allocation in steady state\n" : "ALLOCATIONS in steady state\n");
  return failures == 0 ? 0 : 1;
}

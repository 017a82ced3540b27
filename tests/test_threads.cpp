// Bit-identical results for any number of threads, on shapes drawn at random: channel counts
// around and between the vector widths and the kernels' block sizes, both layouts, every pass,
// 1 to 8 threads. A fixed list of shapes missed channels-last 32 x 520 x 7 x 7 at 3 threads,
// whose split of the channels changed how the sweep accumulated them.

#include <array>
#include <sstream>

#include "util.hpp"

namespace fn = bnorm::functional;
using bnorm::Layout;
using reference::Shape;
using testing::Index;

namespace {

constexpr int kMostThreads = 8;

/// Channel counts near the sizes the kernels cut at: packets of 2 to 16 lanes, their multiples,
/// kFinishBatch (64), the sweeps' wide rows (16 packets) and a page of floats; or any count.
Index draw_channels() {
  static const Index near[] = {1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 520, 1024};
  std::uniform_int_distribution<int> kind(0, 3);
  if (kind(testing::rng()) == 0) return std::uniform_int_distribution<Index>(1, 1100)(testing::rng());
  const Index base = near[std::uniform_int_distribution<std::size_t>(0, std::size(near) - 1)(
      testing::rng())];
  return std::max<Index>(1, base + std::uniform_int_distribution<Index>(-3, 3)(testing::rng()));
}

/// A shape of up to about 1.5 million values: large enough, half the time, for the kernels to
/// split blocks finely over threads (from 1 MiB) and to take their far and streamed paths where
/// the tests' defines make them.
Shape draw_shape() {
  static const Index spatial[] = {1, 1, 2, 3, 7, 9, 15, 25, 49, 100, 196, 784, 3136};
  const Layout layout = std::bernoulli_distribution(0.5)(testing::rng()) ? Layout::ChannelsFirst
                                                                        : Layout::ChannelsLast;
  const Index C = draw_channels();
  const Index S = spatial[std::uniform_int_distribution<std::size_t>(0, std::size(spatial) - 1)(
      testing::rng())];
  const bool large = std::bernoulli_distribution(0.5)(testing::rng());
  const Index values = large ? std::uniform_int_distribution<Index>(300000, 1500000)(testing::rng())
                             : std::uniform_int_distribution<Index>(2, 40000)(testing::rng());
  const Index N = std::max<Index>(2, values / (C * S));
  return {N, C, S, layout};
}

std::string describe(const Shape& s) {
  std::ostringstream o;
  o << "batch " << s.batch << ", channels " << s.channels << ", spatial " << s.spatial
    << (s.layout == Layout::ChannelsFirst ? ", ChannelsFirst" : ", ChannelsLast");
  return o.str();
}

/// A shape's random inputs: x and dy with non-zero means, weight and bias.
template <class T>
struct Inputs {
  explicit Inputs(const Shape& s)
      : sh(s), x(testing::random_input<T>(s)), dy(testing::random_input<T>(s, 1.0)),
        w(testing::random_vector<T>(s.channels, 0.5, 2.0)),
        b(testing::random_vector<T>(s.channels, -1.0, 1.0)) {}
  Shape sh;
  std::vector<T> x, dy, w, b;
};

template <class T>
bool all_finite(const std::vector<T>& v) {
  return std::all_of(v.begin(), v.end(), [](T e) { return std::isfinite(e); });
}

/// Every output of every pass, one after the other.
template <class T>
std::vector<T> every_pass(const Inputs<T>& in, const Eigen::ThreadPoolDevice* device) {
  const Shape& sh = in.sh;
  const std::vector<T>&x = in.x, &dy = in.dy, &w = in.w, &b = in.b;
  const fn::Shape shape{sh.batch, sh.channels, sh.spatial, sh.layout};
  const Index C = sh.channels;
  std::vector<T> out;
  auto append = [&out](const std::vector<T>& v) { out.insert(out.end(), v.begin(), v.end()); };

  auto y = testing::poisoned<T>(sh.size()), mean = testing::poisoned<T>(C),
       invstd = testing::poisoned<T>(C);
  std::vector<T> running_mean(std::size_t(C), T(0.25)), running_var(std::size_t(C), T(3));
  fn::forward_training<T>(shape, x.data(), y.data(), 1e-5, {w.data(), b.data()},
                          {mean.data(), invstd.data()},
                          {running_mean.data(), running_var.data(), 0.1}, {device});
  for (const auto* v : {&y, &mean, &invstd, &running_mean, &running_var}) append(*v);

  auto inferred = testing::poisoned<T>(sh.size());
  fn::forward_inference<T>(shape, x.data(), inferred.data(), 1e-5, {w.data(), b.data()},
                           running_mean.data(), running_var.data(), {device});
  append(inferred);

  for (auto kind : {fn::Statistics::Batch, fn::Statistics::Frozen}) {
    auto dx = testing::poisoned<T>(sh.size()), gw = testing::poisoned<T>(C),
         gb = testing::poisoned<T>(C);
    fn::backward<T>(shape, dy.data(), x.data(), dx.data(), kind, mean.data(), invstd.data(),
                    w.data(), gw.data(), gb.data(), {device});
    for (const auto* v : {&dx, &gw, &gb}) append(*v);
  }
  return out;
}

template <class T>
void check_draws(int draws) {
  std::array<std::unique_ptr<testing::Pool>, kMostThreads + 1> pools;
  for (int t = 2; t <= kMostThreads; ++t) pools[std::size_t(t)] = std::make_unique<testing::Pool>(t);
  for (int i = 0; i < draws; ++i) {
    const Inputs<T> in(draw_shape());
    INFO(describe(in.sh));
    const auto one = every_pass(in, nullptr);
    // Every value written (poisoned buffers hold NaN, and the inputs are finite).
    REQUIRE(all_finite(one));
    for (int t = 2; t <= kMostThreads; ++t) {
      INFO("threads " << t);
      CHECK(testing::same_bits(every_pass(in, pools[std::size_t(t)]->device.get()), one));
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("every pass is bit-identical for 1 to 8 threads on random shapes",
                   "[functional][threads]", float, double) {
  check_draws<TestType>(12);
}

TEST_CASE("every pass gives the same bits under every tuning", "[functional][threads]") {
  // Streamed or plain stores, far parts, groups of channels, reductions in groups: how a pass
  // walks memory never changes what it computes.
  const bnorm::Tuning program = bnorm::tuning();
  struct Restore {
    bnorm::Tuning t;
    ~Restore() { bnorm::set_tuning(t); }
  } restore{program};
  bnorm::Tuning machine = bnorm::machine_tuning(), small = machine, streamed = machine;
  CHECK(machine.last_level_cache_bytes > 0);
  small.last_level_cache_bytes = 1000000;
  small.far_bytes = 0;
  small.group_bytes = 300000;
  streamed.stream_bytes = 0;
  streamed.stream_by_size_alone = true;
  streamed.line_bytes = 0;  // packets of every width stream
  testing::Pool two(2);
  for (int i = 0; i < 6; ++i) {
    const Inputs<float> in(draw_shape());
    INFO(describe(in.sh));
    bnorm::set_tuning(machine);
    const auto first = every_pass(in, two.device.get());
    REQUIRE(all_finite(first));
    const bnorm::Tuning* tunings[] = {&small, &streamed, &program};
    for (const bnorm::Tuning* t : tunings) {
      bnorm::set_tuning(*t);
      CHECK(testing::same_bits(every_pass(in, two.device.get()), first));
      CHECK(testing::same_bits(every_pass(in, nullptr), first));
    }
  }
}

TEST_CASE("channels-last 32 x 520 x 7 x 7 is bit-identical at 3 threads", "[functional][threads]") {
  const Inputs<float> in(Shape{32, 520, 49, Layout::ChannelsLast});
  testing::Pool three(3);
  CHECK(testing::same_bits(every_pass(in, three.device.get()), every_pass(in, nullptr)));
}

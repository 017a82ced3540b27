// The kernels (bnorm::functional) against the double reference, over shapes that reach every
// path: vectorized along runs and across channels, tails, long rows cut into pieces, many
// blocks, fused and split threading; and bit-identical results for any number of threads.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <utility>

#include "util.hpp"

namespace fn = bnorm::functional;
using bnorm::Layout;
using reference::Shape;
using testing::Index;

namespace {

const Layout kFirst = Layout::ChannelsFirst, kLast = Layout::ChannelsLast;

std::vector<Shape> shapes() {
  return {
      {2, 3, 7, kFirst},      {3, 5, 1, kFirst},     {2, 3, 49, kFirst},   {5, 4, 100, kFirst},
      {1, 2, 5000, kFirst},   {3, 2, 9001, kFirst},  {300, 2, 17, kFirst}, {2, 37, 33, kFirst},
      {7, 3, 1, kLast},       {2, 3, 7, kLast},      {5, 37, 3, kLast},    {40, 1030, 1, kLast},
      {300, 1030, 1, kLast},  {2000, 3, 1, kLast},   {9, 17, 13, kLast},   {2, 1, 3, kFirst},
      // Short runs, read in row order (or swept position by position where shorter than a
      // packet): several blocks of rows per channel, the last one cut short, in one piece of
      // channels or in several (the last one narrower); backward, where the cache is
      // set small, in groups of channels (the last one narrower) applied with blended
      // coefficients. Long runs cut into pieces, on the fused path: where the group room is
      // set small, in groups of two channels (one for backward), the last one narrower.
      {300, 37, 17, kFirst},  {150, 70, 15, kFirst}, {2, 9, 33000, kFirst},
      // Runs of a multiple of every packet size: a row's channels applied as one run (read in
      // row order with AVX2 and AVX-512, on the fused path without).
      {3, 5, 272, kFirst},
      // Runs of one to three packets, whose coefficients each packet selects (SelectCoefs):
      // 2 values for the scalar program; 7, 15, 17 and 33 reach it with wider packets.
      {5, 3, 2, kFirst},
      // Channels in whole groups of a packet's width and runs of under four packets, whose
      // packets permute their group's coefficients (GroupCoefs) where the target permutes in
      // one instruction (AVX2 floats, AVX-512): 7 and 17 values in two or four groups; 49
      // values in one group, which wraps around at every row, for AVX-512 floats.
      {3, 32, 7, kFirst},     {3, 32, 17, kFirst},   {4, 16, 49, kFirst},
      // Channels-last with several blocks of rows, each swept in sub-blocks, the last ones cut
      // short (odd rows left over); narrow and wide rows, channels not a multiple of a packet.
      {5, 7, 1715, kLast},    {2100, 1030, 1, kLast},
      // Channels-last rows of few channels, seen q rows at a time as rows of whole packets
      // (see period_rows), with rows left over, in one block or several.
      {2003, 3, 1, kLast},    {333, 12, 3, kLast},   {50, 6, 31, kLast},   {4, 5, 20001, kLast},
  };
}

std::string describe(const Shape& s) {
  return "batch " + std::to_string(s.batch) + ", channels " + std::to_string(s.channels) +
         ", spatial " + std::to_string(s.spatial) +
         (s.layout == kFirst ? ", ChannelsFirst" : ", ChannelsLast");
}

fn::Shape to_fn(const Shape& s) { return {s.batch, s.channels, s.spatial, s.layout}; }

template <class T>
struct TrainingRun {
  std::vector<T> y, mean, invstd, running_mean, running_var;
};

template <class T>
TrainingRun<T> run_training(const Shape& sh, const std::vector<T>& x, const std::vector<T>& w,
                            const std::vector<T>& b, double eps, double momentum, int workers) {
  testing::Pool pool(workers);
  TrainingRun<T> r{testing::poisoned<T>(sh.size()), testing::poisoned<T>(sh.channels),
                   testing::poisoned<T>(sh.channels), std::vector<T>(sh.channels, T(0.5)),
                   std::vector<T>(sh.channels, T(2))};
  fn::forward_training<T>(to_fn(sh), x.data(), r.y.data(), eps, {w.data(), b.data()},
                          {r.mean.data(), r.invstd.data()},
                          {r.running_mean.data(), r.running_var.data(), momentum},
                          {pool.device.get()});
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("forward_training matches the reference on every path", "[functional]", float,
                   double) {
  using T = TestType;
  for (const Shape& sh : shapes()) {
    INFO(describe(sh));
    const auto x = testing::random_input<T>(sh);
    const auto w = testing::random_vector<T>(sh.channels, 0.5, 2.0);
    const auto b = testing::random_vector<T>(sh.channels, -1.0, 1.0);
    const double eps = 1e-3, momentum = 0.3;

    const auto st = reference::batch_stats(sh, x);
    const auto y = reference::normalize(sh, x, st, eps, testing::widen(w), testing::widen(b));
    std::vector<double> invstd(sh.channels), rm(sh.channels), rv(sh.channels);
    const double n = double(sh.per_channel());
    for (Index c = 0; c < sh.channels; ++c) {
      invstd[c] = 1 / std::sqrt(st.var[c] + eps);
      rm[c] = (1 - momentum) * 0.5 + momentum * st.mean[c];
      rv[c] = (1 - momentum) * 2.0 + momentum * st.var[c] * n / (n - 1);
    }

    TrainingRun<T> first;
    for (int workers : {0, 1, 2, 3}) {
      INFO("workers " << workers);
      const auto r = run_training(sh, x, w, b, eps, momentum, workers);
      testing::check_close(r.y, y, "y");
      testing::check_close(r.mean, st.mean, "mean");
      testing::check_close(r.invstd, invstd, "invstd");
      testing::check_close(r.running_mean, rm, "running_mean");
      testing::check_close(r.running_var, rv, "running_var");
      if (workers == 0) {
        first = r;
      } else {
        CHECK(testing::same_bits(r.y, first.y));
        CHECK(testing::same_bits(r.mean, first.mean));
        CHECK(testing::same_bits(r.invstd, first.invstd));
        CHECK(testing::same_bits(r.running_var, first.running_var));
      }
    }
  }
}

TEMPLATE_TEST_CASE("forward_inference folds running statistics", "[functional]", float, double) {
  using T = TestType;
  for (const Shape& sh : shapes()) {
    INFO(describe(sh));
    const auto x = testing::random_input<T>(sh);
    const auto w = testing::random_vector<T>(sh.channels, -2.0, 2.0);
    const auto b = testing::random_vector<T>(sh.channels, -1.0, 1.0);
    const auto rm = testing::random_vector<T>(sh.channels, -10.0, 10.0);
    const auto rv = testing::random_vector<T>(sh.channels, 0.01, 50.0);
    const reference::Stats st{testing::widen(rm), testing::widen(rv)};
    const auto expected =
        reference::normalize(sh, x, st, 1e-5, testing::widen(w), testing::widen(b));
    for (int workers : {0, 2, 3}) {
      testing::Pool pool(workers);
      auto y = testing::poisoned<T>(sh.size());
      fn::forward_inference<T>(to_fn(sh), x.data(), y.data(), 1e-5, {w.data(), b.data()},
                               rm.data(), rv.data(), {pool.device.get()});
      // Folding mean and bias into one shift costs the cancellation of x * scale - mean * scale:
      // measured against the output's own scale it stays at rounding level.
      testing::check_close(y, expected, "y");
    }
  }
}

TEMPLATE_TEST_CASE("backward matches the reference for batch and frozen statistics",
                   "[functional]", float, double) {
  using T = TestType;
  for (const Shape& sh : shapes()) {
    INFO(describe(sh));
    const auto x = testing::random_input<T>(sh);
    const auto dy = testing::random_input<T>(sh, 1.0);
    const auto w = testing::random_vector<T>(sh.channels, 0.5, 2.0);
    const double eps = 1e-4;
    for (bool batch : {true, false}) {
      INFO((batch ? "batch statistics" : "frozen statistics"));
      reference::Stats st = reference::batch_stats(sh, x);
      if (!batch) {  // frozen: some other statistics
        for (auto& m : st.mean) m += 0.5;
        for (auto& v : st.var) v *= 1.5;
      }
      // The kernel gets the statistics rounded to T; so does the reference (x - mean summed
      // over a whole channel would otherwise amplify the rounding of the mean).
      std::vector<T> mean(sh.channels), invstd(sh.channels);
      for (Index c = 0; c < sh.channels; ++c) {
        mean[c] = T(st.mean[c]);
        st.mean[c] = double(mean[c]);
        invstd[c] = T(1 / std::sqrt(st.var[c] + eps));
      }
      const auto g = reference::backward(sh, x, dy, st, eps, testing::widen(w), batch);
      std::vector<T> first;
      for (int workers : {0, 1, 2, 3}) {
        INFO("workers " << workers);
        testing::Pool pool(workers);
        auto dx = testing::poisoned<T>(sh.size());
        auto gw = testing::poisoned<T>(sh.channels), gb = testing::poisoned<T>(sh.channels);
        fn::backward<T>(to_fn(sh), dy.data(), x.data(), dx.data(),
                        batch ? fn::Statistics::Batch : fn::Statistics::Frozen, mean.data(),
                        invstd.data(), w.data(), gw.data(), gb.data(), {pool.device.get()});
        testing::check_close(dx, g.dx, "dx");
        testing::check_sum_close(gw, g.weight, g.weight_terms, "grad_weight");
        testing::check_sum_close(gb, g.bias, g.bias_terms, "grad_bias");
        if (workers == 0) {
          first = dx;
          first.insert(first.end(), gw.begin(), gw.end());
        } else {
          dx.insert(dx.end(), gw.begin(), gw.end());
          CHECK(testing::same_bits(dx, first));
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("forward and backward work in place", "[functional]", float, double) {
  using T = TestType;
  for (const Shape& sh : {Shape{4, 3, 50, kFirst}, Shape{50, 19, 1, kLast}}) {
    const auto x = testing::random_input<T>(sh);
    std::vector<T> y(x.size()), inplace = x, mean(sh.channels), invstd(sh.channels);
    fn::forward_training<T>(to_fn(sh), x.data(), y.data(), 1e-5, {}, {mean.data(), invstd.data()});
    fn::forward_training<T>(to_fn(sh), inplace.data(), inplace.data(), 1e-5);
    CHECK(testing::same_bits(y, inplace));

    const auto dy = testing::random_input<T>(sh, 1.0);
    std::vector<T> dx(x.size()), dx_inplace = dy;
    fn::backward<T>(to_fn(sh), dy.data(), x.data(), dx.data(), fn::Statistics::Batch, mean.data(),
                    invstd.data(), nullptr, nullptr, nullptr);
    fn::backward<T>(to_fn(sh), dx_inplace.data(), x.data(), dx_inplace.data(),
                    fn::Statistics::Batch, mean.data(), invstd.data(), nullptr, nullptr, nullptr);
    CHECK(testing::same_bits(dx, dx_inplace));
  }
}

/// A tensor placed `offset` values after a 64-byte boundary, between guard values (NaN) that
/// must stay as they are.
template <class T>
struct Placed {
  static constexpr Index kGuard = 64 / Index(sizeof(T));
  Placed(Index n, Index offset, const std::vector<T>* from = nullptr)
      : storage(testing::poisoned<T>(n + offset + 3 * kGuard)), n(n) {
    Index first = kGuard;  // guard values before the data, then a 64-byte boundary
    while (reinterpret_cast<std::uintptr_t>(storage.data() + first) % 64 != 0) ++first;
    data = storage.data() + first + offset;
    if (from) std::copy(from->begin(), from->end(), data);
  }
  std::vector<T> values() const { return std::vector<T>(data, data + n); }
  bool guards_intact() const {
    for (const T* p = storage.data(); p < storage.data() + storage.size(); ++p)
      if ((p < data || p >= data + n) && !std::isnan(*p)) return false;
    return true;
  }
  std::vector<T> storage;
  Index n;
  T* data;
};

/// The outputs of one call in the first placement tried, which must be written in full; those
/// of every other placement must have their bits.
template <class T>
struct FirstResults {
  std::vector<std::vector<T>> outputs;
  void check(std::vector<std::vector<T>> now) {
    if (outputs.empty()) {
      outputs = std::move(now);
      for (const auto& v : outputs)
        CHECK(std::all_of(v.begin(), v.end(), [](T e) { return std::isfinite(e); }));
    } else {
      for (std::size_t i = 0; i < now.size(); ++i) CHECK(testing::same_bits(now[i], outputs[i]));
    }
  }
};

TEMPLATE_TEST_CASE("results do not depend on where the buffers lie", "[functional]", float,
                   double) {
  // The elementwise pass aligns its stores (cutting its first packet short, unless its
  // coefficients go by whole packets from the run's start: then it reads and writes misaligned
  // packets, and streams nothing), so inputs and
  // outputs at different offsets from a cache line take different paths: short first packets,
  // runs of channels split or not, streamed stores or not. Every placement must give the same
  // bits, and write nothing outside the output.
  using T = TestType;
  // Rows of 1024 channels (a multiple of 4 KiB) and of 512 x 3 values (half of it) place the
  // reductions' tables by the rows (see apart_from), which move with the inputs.
  const Shape cases[] = {{3, 5, 272, kFirst}, {300, 37, 17, kFirst}, {2, 3, 9001, kFirst},
                         {3, 32, 17, kFirst},  {3, 32, 7, kFirst},     {40, 1030, 1, kLast},
                         {9, 17, 13, kLast},   {40, 1024, 1, kLast},   {5, 512, 3, kFirst}};
  const std::pair<Index, Index> placements[] = {{0, 0}, {1, 1}, {3, 5}, {0, 7}, {5, 0}, {13, 2}};
  for (const Shape& sh : cases) {
    INFO(describe(sh));
    const auto x = testing::random_input<T>(sh);
    const auto dy = testing::random_input<T>(sh, 1.0);
    const auto w = testing::random_vector<T>(sh.channels, 0.5, 2.0);
    const auto b = testing::random_vector<T>(sh.channels, -1.0, 1.0);
    FirstResults<T> first;
    for (const auto& [in_at, out_at] : placements) {
      INFO("inputs " << in_at << " and output " << out_at << " values after a 64-byte boundary");
      const Placed<T> px(sh.size(), in_at, &x), pdy(sh.size(), in_at, &dy);
      Placed<T> py(sh.size(), out_at), pdx(sh.size(), out_at), pinfer(sh.size(), out_at);
      std::vector<T> mean(sh.channels), invstd(sh.channels), gw(sh.channels), gb(sh.channels);
      fn::forward_training<T>(to_fn(sh), px.data, py.data, 1e-5, {w.data(), b.data()},
                              {mean.data(), invstd.data()});
      fn::forward_inference<T>(to_fn(sh), px.data, pinfer.data, 1e-5, {w.data(), b.data()},
                               mean.data(), invstd.data());
      fn::backward<T>(to_fn(sh), pdy.data, px.data, pdx.data, fn::Statistics::Batch, mean.data(),
                      invstd.data(), w.data(), gw.data(), gb.data());
      CHECK(py.guards_intact());
      CHECK(pinfer.guards_intact());
      CHECK(pdx.guards_intact());
      first.check({py.values(), pinfer.values(), pdx.values()});
    }
  }
}

TEMPLATE_TEST_CASE("outputs just past their inputs modulo 4 KiB give the same results",
                   "[functional]", float, double) {
  // An output a few cache lines past an input, modulo 4 KiB, is walked with its inputs loaded
  // ahead (see kAliasBytes): x, dy and the output lie a whole number of pages apart, plus `trail`
  // bytes for the output. Every trail must give the bits of outputs pages apart.
  using T = TestType;
  const Shape cases[] = {{3, 5, 272, kFirst}, {300, 37, 17, kFirst}, {3, 32, 17, kFirst},
                         {3, 32, 7, kFirst},  {40, 1030, 1, kLast},   {9, 17, 13, kLast}};
  const Index page = 4096 / Index(sizeof(T));
  for (const Shape& sh : cases) {
    INFO(describe(sh));
    const Index n = sh.size(), span = (n + page - 1) / page * page + page;  // x, dy: a span each
    const auto x0 = testing::random_input<T>(sh);
    const auto dy0 = testing::random_input<T>(sh, 1.0);
    const auto w = testing::random_vector<T>(sh.channels, 0.5, 2.0);
    const auto b = testing::random_vector<T>(sh.channels, -1.0, 1.0);
    FirstResults<T> first;
    for (const Index trail : {0, 16, 64, 128, 192, 320}) {
      INFO("output " << trail << " bytes past the inputs, modulo 4 KiB");
      auto storage = testing::poisoned<T>(4 * span + 2 * page);
      T* x = testing::page_aligned(storage);
      const Index start = x - storage.data();
      T* dy = x + span;
      T* out = dy + span + trail / Index(sizeof(T));
      std::copy(x0.begin(), x0.end(), x);
      std::copy(dy0.begin(), dy0.end(), dy);
      std::vector<T> mean(sh.channels), invstd(sh.channels), gw(sh.channels), gb(sh.channels);
      const auto written = [&] { return std::vector<T>(out, out + n); };
      const auto untouched = [&] {  // nothing written outside the output
        for (Index i = 2 * span; i < Index(storage.size()) - start; ++i)
          if ((x + i < out || x + i >= out + n) && !std::isnan(x[i])) return false;
        return true;
      };
      fn::forward_training<T>(to_fn(sh), x, out, 1e-5, {w.data(), b.data()},
                              {mean.data(), invstd.data()});
      const auto y = written();
      fn::forward_inference<T>(to_fn(sh), x, out, 1e-5, {w.data(), b.data()}, mean.data(),
                               invstd.data());
      const auto infer = written();
      std::fill(out, out + n, std::numeric_limits<T>::quiet_NaN());
      fn::backward<T>(to_fn(sh), dy, x, out, fn::Statistics::Batch, mean.data(), invstd.data(),
                      w.data(), gw.data(), gb.data());
      const auto dx = written();
      CHECK(untouched());
      first.check({y, infer, dx});
    }
  }
}

TEMPLATE_TEST_CASE("reduction tables lie in the widest gap between the rows modulo 4 KiB",
                   "[functional]", float, double) {
  // apart_from: rows `pitch` apart lie on a lattice of period gcd(pitch bytes, 4 KiB) modulo
  // 4 KiB, one per input; the tables start within the page the room has to spare, on a cache
  // line, in the middle of the widest gap between the lattices.
  using T = TestType;
  struct Case {
    Index pitch_bytes, in0, in1, period, want;  // in0, in1: the inputs' byte offsets in a page
  };
  const Case cases[] = {
      {4096, 0, 0, 4096, 2048},     // one lattice of rows whole pages apart: half a page on
      {8192, 0, 1024, 4096, 2560},  // the gap from 1024 round to 4096 is the wider one
      {6144, 256, 256, 2048, 1280}, // rows 2 KiB apart modulo 4 KiB
      {1024, 0, 64, 1024, 512},     // 64 + 480, down to a cache line
      {24, 8, 8, 64, 0},            // rows on every 8 bytes: any cache line will do
  };
  const Index page = 4096 / Index(sizeof(T));
  std::vector<T> storage(std::size_t(4 * page));
  T* base = testing::page_aligned(storage);
  const auto offset = [](const T* p) { return Index(reinterpret_cast<std::uintptr_t>(p) % 4096); };
  for (const Case& c : cases) {
    for (const Index room_at : {Index(0), Index(sizeof(T)), Index(64), Index(4000)}) {
      INFO("pitch " << c.pitch_bytes << " bytes, inputs at " << c.in0 << " and " << c.in1
                    << ", room at " << room_at);
      T* room = base + page + room_at / Index(sizeof(T));
      const T* in[] = {base + c.in0 / Index(sizeof(T)), base + c.in1 / Index(sizeof(T))};
      const T* got = bnorm::detail::apart_from<2>(room, in, c.pitch_bytes / Index(sizeof(T)));
      CHECK(got >= room);
      CHECK(got < room + page);
      CHECK(offset(got) % 64 == 0);
      CHECK(offset(got) % c.period == c.want);
    }
  }
}

TEST_CASE("parallel_workers waits for every worker, whether it finishes first or last",
          "[functional]") {
  // The calling thread does worker 0's range, polls for the others' for a while, then blocks.
  // Each range must be run once, by its worker, and all of them before the call returns: with
  // the workers done long before the calling thread, and long after its polling ends.
  using bnorm::detail::kPollFor;
  for (const int workers : {2, 3}) {
    const testing::Pool pool(workers);
    for (const bool workers_late : {false, true}) {
      INFO(workers << " workers, " << (workers_late ? "the workers" : "the caller") << " late");
      const Index count = 1001;
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(count));
      std::vector<std::atomic<Index>> worker_of(static_cast<std::size_t>(count));
      const auto run = [&](Index w, Index begin, Index end) {
        if ((w > 0) == workers_late) std::this_thread::sleep_for(3 * kPollFor);
        for (Index i = begin; i < end; ++i) {
          runs[std::size_t(i)] += 1;
          worker_of[std::size_t(i)] = w;
        }
      };
      bnorm::detail::parallel_workers(pool.device.get(), count, run);
      Index wrong = 0;
      for (Index w = 0; w < workers; ++w)  // worker w's range, as parallel_workers promises
        for (Index i = count * w / workers; i < count * (w + 1) / workers; ++i)
          wrong += runs[std::size_t(i)] != 1 || worker_of[std::size_t(i)] != w;
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("functional rejects bad arguments before writing anything", "[functional]") {
  std::vector<float> x(6, 1.f), y(6, 7.f), rm(3, 0.f), rv(3, 1.f);
  const fn::Shape one_per_channel{1, 3, 1};
  CHECK_THROWS_WITH(fn::forward_training<float>(one_per_channel, x.data(), y.data(), 1e-5, {}, {},
                                                {rm.data(), rv.data(), 0.1}),
                    Catch::Contains("more than 1 value per channel"));
  CHECK_THROWS_WITH(fn::forward_training<float>({2, 3, 1}, x.data(), y.data(), -1.0),
                    Catch::Contains("eps"));
  CHECK_THROWS_WITH(fn::forward_training<float>({2, 3, 1}, x.data(), y.data(), 1e-5, {}, {},
                                                {rm.data(), rv.data(), 1.5}),
                    Catch::Contains("momentum"));
  CHECK_THROWS_WITH(fn::forward_training<float>({2, 0, 1}, x.data(), y.data(), 1e-5),
                    Catch::Contains("channels >= 1"));
  CHECK(y == std::vector<float>(6, 7.f));
  CHECK(rm == std::vector<float>(3, 0.f));
  CHECK(rv == std::vector<float>(3, 1.f));
}

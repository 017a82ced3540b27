// The plan: the machine model it decides by, and the decisions it makes for machines other than
// the one the tests run on. Plans are values, so a test describes a machine and reads them.

#include <stdexcept>

#include "util.hpp"

namespace fn = bnorm::functional;
namespace core = bnorm::detail;
using bnorm::Layout;
using bnorm::Tuning;
using testing::Index;

namespace {

constexpr Index kMiB = Index{1} << 20;

/// A machine with these caches and nothing else overridden, its cache lines no wider than this
/// program's packets of float, so that the sizes alone decide on streamed stores (the line's own
/// part is tested apart).
Tuning machine(Index l2, Index last_level, Index cpus) {
  Tuning t;
  t.l2_bytes = l2;
  t.last_level_cache_bytes = last_level;
  t.last_level_cpus = cpus;
  t.line_bytes = core::kPacketBytes<float>;
  return t;
}

/// Our 2-core VM: 1 MiB of L2 per core, 32 MiB of L3 that Linux says the 2 CPUs share.
const Tuning kTwoCores = machine(kMiB, 32 * kMiB, 2);
/// The 16-core VM whose hypervisor reports the host socket's 300 MiB L3, 2 MiB of L2 per core.
const Tuning kSixteenCores = machine(2 * kMiB, 300 * kMiB, 16);

template <class T = float>
core::Plan plan(const Tuning& m, Index outer, Index channels, Index inner, core::Traffic traffic,
                Index threads) {
  return core::make_plan<T>(core::Geometry{outer, channels, inner}, traffic, threads, m);
}

const core::Traffic kTraining{1, 1, false}, kInference{0, 1, false}, kBackward{2, 2, false};

}  // namespace

TEST_CASE("a call counts on its threads' share of the last-level cache", "[plan]") {
  CHECK(kTwoCores.usable_last_level_bytes() == 32 * kMiB);
  CHECK(kSixteenCores.usable_last_level_bytes() == 300 * kMiB);
  CHECK(kTwoCores.cache_share(1) == 16 * kMiB);
  CHECK(kTwoCores.cache_share(2) == 32 * kMiB);
  CHECK(kTwoCores.cache_share(8) == 32 * kMiB);  // never more than the whole cache
  CHECK(kSixteenCores.cache_share(1) == 300 * kMiB / 16);
  CHECK(kSixteenCores.cache_share(4) == 300 * kMiB / 4);
  CHECK(kSixteenCores.cache_share(16) == 300 * kMiB);
  // A socket's cache reported to a VM of two CPUs: each thread is counted at most 16 L2s.
  const Tuning socket_to_two = machine(2 * kMiB, 300 * kMiB, 2);
  CHECK(socket_to_two.usable_last_level_bytes() == 64 * kMiB);
  CHECK(socket_to_two.cache_share(1) == 32 * kMiB);
  CHECK(socket_to_two.cache_share(2) == 64 * kMiB);
  CHECK(machine(kMiB, 32 * kMiB, 0).cache_share(0) == 16 * kMiB);  // nonsense counts as 1
}

TEST_CASE("the machine's figures are read and sane", "[plan]") {
  const Tuning t = bnorm::machine_tuning();
  CHECK(t.l1_bytes >= 16 * 1024);
  CHECK(t.l2_bytes >= 256 * 1024);
  CHECK(t.last_level_cache_bytes >= t.l2_bytes);
  CHECK(t.last_level_cpus >= 1);
  CHECK(core::count_cpus("0-7,16-23") == 16);
  CHECK(core::count_cpus("3") == 1);
  CHECK(core::count_cpus("0,2,4") == 3);
  CHECK(core::count_cpus("") == 0);
  CHECK(core::count_cpus("x-y") == 0);
}

TEST_CASE("outputs are streamed by the threads' share of the cache", "[plan]") {
  // 32 x 256 x 56 x 56 training, 102.8 MB in and out: on 4 of 16 cores whose VM reports 300 MiB
  // of L3, the two tensors fit the whole cache but not 4 cores' share of it.
  const Index N = 32, C = 256, HW = 56 * 56;
  CHECK(plan(kSixteenCores, N, C, HW, kTraining, 1).stream);  // one thread: by size alone
  CHECK(plan(kSixteenCores, N, C, HW, kTraining, 4).stream);
  CHECK(plan(kSixteenCores, N, C, HW, kTraining, 8).stream);
  CHECK(plan(kSixteenCores, N, C, HW, kBackward, 8).stream);
  // 32 x 512 x 28 x 28 (51 MB a tensor) exceeds 4 cores' share, not 16 cores'.
  CHECK(plan(kSixteenCores, N, 512, 28 * 28, kTraining, 4).stream);
  CHECK_FALSE(plan(kSixteenCores, N, 512, 28 * 28, kTraining, 16).stream);
  // Below Tuning::stream_bytes nothing streams, whatever the threads.
  CHECK_FALSE(plan(kSixteenCores, N, 64, 7 * 7, kTraining, 1).stream);
  // Channels-last data decides alike.
  CHECK(plan(kSixteenCores, N * HW, C, 1, kInference, 4).stream);
  CHECK_FALSE(plan(kSixteenCores, N * 784, 512, 1, kInference, 16).stream);
  // The 2-core VM, 2 threads: 12.8 MB in and out fits the 32 MiB L3 (measured faster plain).
  CHECK_FALSE(plan(kTwoCores, N, 128, 28 * 28, kInference, 2).stream);
  CHECK(plan(kTwoCores, N, C, HW, kInference, 2).stream);
}

TEST_CASE("a call of many views streams as the whole of them would", "[plan]") {
  // Channels-last GroupNorm on 8 x 512 x 32 x 32 plans a sample at a time: a view of 2 MiB, whose
  // output the next samples push out of the cache. The 8 of them together pass stream_bytes.
  const Index spatial = 32 * 32, C = 512;
  core::Traffic sample = kTraining;
  CHECK_FALSE(plan(kTwoCores, spatial, C, 1, sample, 1).stream);
  sample.views = 8;
  const core::Plan p = plan(kTwoCores, spatial, C, 1, sample, 1);
  CHECK(p.stream);
  // Only the stores: what the kernels walk is still the one view.
  CHECK(p.view.outer == spatial);
  CHECK(p.parts == plan(kTwoCores, spatial, C, 1, kTraining, 1).parts);
  core::Traffic backward = kBackward;
  backward.views = 8;
  CHECK(plan(kTwoCores, spatial, C, 1, backward, 1).stream);
  backward.views = 2;  // 4 MiB of output in all
  CHECK_FALSE(plan(kTwoCores, spatial, C, 1, backward, 1).stream);
}

TEST_CASE("only stores of whole cache lines stream", "[plan]") {
  // 32 x 256 x 56 x 56, one thread: large enough to stream by size.
  const Index N = 32, C = 256, HW = 56 * 56;
  Tuning m = kTwoCores;
  const Index packet = core::kPacketBytes<float>;
  m.line_bytes = packet;
  CHECK(plan(m, N, C, HW, kTraining, 1).stream);
  CHECK(plan(m, N * HW, C, 1, kBackward, 1).stream);
  // A packet of 16-bit values takes half the bytes of float's: half a line.
  CHECK_FALSE(plan<Eigen::bfloat16>(m, N, C, HW, kTraining, 1).stream);
  CHECK_FALSE(plan<Eigen::half>(m, N * HW, C, 1, kInference, 1).stream);
  m.line_bytes = core::kPacketBytes<Eigen::bfloat16>;
  CHECK(plan<Eigen::bfloat16>(m, N, C, HW, kTraining, 1).stream);
  // Lines wider than a packet: nothing streams.
  m.line_bytes = 2 * packet;
  CHECK_FALSE(plan(m, N, C, HW, kTraining, 1).stream);
  CHECK_FALSE(plan(m, N * HW, C, 1, kInference, 1).stream);
  // The machine's own line, as Linux reports it.
  CHECK(bnorm::machine_tuning().line_bytes >= 16);
}

TEST_CASE("groups of channels split the usable cache among the workers", "[plan]") {
  // Long channels-first runs: each worker takes whole channels, a group of them at a time, whose
  // inputs take at most a quarter of the usable cache over the workers (and at least 512 KiB).
  const Index N = 32, HW = 56 * 56, bytes_per_channel = N * HW * 4;
  for (Index threads : {1, 4, 16}) {
    INFO("threads " << threads);
    const core::Plan p = plan(kSixteenCores, N, 256, HW, kTraining, threads);
    REQUIRE(p.split == core::Split::Groups);
    const Index room = std::max<Index>(512 * 1024, 300 * kMiB / 4 / threads);
    CHECK(p.group_channels == std::max<Index>(1, room / bytes_per_channel));
  }
  // Too few channels for every worker: the blocks are shared out instead.
  CHECK(plan(kSixteenCores, N, 32, HW, kTraining, 16).split == core::Split::Pieces);
  // Inference reduces nothing.
  CHECK(plan(kSixteenCores, N, 256, HW, kInference, 4).reduction == core::Reduction::None);
}

TEST_CASE("backward's row-order reductions go in groups past the usable cache", "[plan]") {
  // 32 x 1024 x 14 x 14: x and dy are 51 MB together.
  const Index N = 32, C = 1024, HW = 196;
  if (!core::in_row_order<float>(core::Geometry{N, C, HW})) {  // runs of too many packets
    CHECK(plan(kTwoCores, N, C, HW, kBackward, 1).reduction == core::Reduction::Sweep);
    return;
  }
  CHECK(plan(kTwoCores, N, C, HW, kBackward, 1).split == core::Split::Groups);
  CHECK(plan(kTwoCores, N, C, HW, kBackward, 2).split == core::Split::Groups);
  CHECK(plan(kTwoCores, N, C, HW, kTraining, 1).split == core::Split::Channels);  // one input
  CHECK(plan(kSixteenCores, N, C, HW, kBackward, 1).split == core::Split::Channels);
  // A socket's 300 MiB reported to 2 CPUs is used as 64 MiB: 2048 channels exceed it.
  const Tuning socket_to_two = machine(2 * kMiB, 300 * kMiB, 2);
  CHECK(plan(socket_to_two, N, C, HW, kBackward, 1).split == core::Split::Channels);
  CHECK(plan(socket_to_two, N, 2 * C, HW, kBackward, 1).split == core::Split::Groups);
}

TEST_CASE("plans of small channels-last batches split rows or channels by the blocks",
          "[plan]") {
  // 32 x 2048 x 7 x 7 channels-last: 1568 rows make fewer blocks than the workers, so the
  // workers share out every block's channels.
  const core::Plan p = plan(kSixteenCores, 32 * 49, 2048, 1, kTraining, 16);
  CHECK(p.blocking.blocks < 16);
  CHECK(p.split == core::Split::ChannelPackets);
  CHECK(p.merge_on_workers);
  // Tiny tensors stay on whole blocks and merge on the calling thread.
  const core::Plan tiny = plan(kSixteenCores, 16, 64, 1, kTraining, 16);
  CHECK(tiny.split == core::Split::WholeBlocks);
  CHECK_FALSE(tiny.merge_on_workers);
}

TEST_CASE("few channels-last channels are planned as a wider view", "[plan]") {
  const core::Plan p = plan(kTwoCores, 256 * 1024, 3, 1, kTraining, 1);
  CHECK(p.period > 1);
  CHECK(p.view.channels == 3 * p.period);
  CHECK(p.view.outer == 256 * 1024 / p.period);
  CHECK(plan(kTwoCores, 256 * 1024, 512, 1, kTraining, 1).period == 1);
}

TEST_CASE("describe_plan tells every decision, and checks its arguments", "[plan]") {
  const fn::Shape shape{32, 64, 56 * 56, Layout::ChannelsFirst};
  const std::string d = fn::describe_plan<float>(shape, fn::Pass::Backward, 2);
  for (const char* line : {"tensor:", "threads:     2", "reduction:", "split:", "merge:",
                           "elementwise:"})
    CHECK(d.find(line) != std::string::npos);
  const std::string infer = fn::describe_plan<double>(shape, fn::Pass::Inference, 1, true);
  CHECK(infer.find("reduction:   none") != std::string::npos);
  CHECK_THROWS_AS(fn::describe_plan<float>(shape, fn::Pass::Training, 0), std::invalid_argument);
  CHECK_THROWS_AS(fn::describe_plan<float>(fn::Shape{-1, 3, 1}, fn::Pass::Training, 1),
                  std::invalid_argument);
}

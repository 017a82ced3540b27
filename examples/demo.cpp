// One training step of batch normalization, shown number by number.
//
// A batch of 8 samples by 4 features whose means and scales differ wildly goes through a
// BatchNorm1d: the demo prints the batch statistics, the normalized values, the output after
// the learnable scale (gamma) and shift (beta), the running statistics the step leaves behind,
// what eval mode makes of the same batch, and a histogram of each feature before and after.

#include <bnorm/bnorm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

constexpr int kSamples = 8, kFeatures = 4;
using Batch = Eigen::Tensor<double, 2, Eigen::RowMajor>;

void rule() { std::printf("  %s\n", std::string(10 + 11 * kFeatures, '-').c_str()); }

void header() {
  std::printf("  %-10s", "");
  for (int f = 0; f < kFeatures; ++f) std::printf("  feature %d", f);
  std::printf("\n");
  rule();
}

void table(const char* title, const Batch& t) {
  std::printf("\n%s\n", title);
  header();
  for (int n = 0; n < kSamples; ++n) {
    std::printf("  sample %-3d", n);
    for (int f = 0; f < kFeatures; ++f) std::printf(" %10.3f", t(n, f));
    std::printf("\n");
  }
}

void row(const char* name, const std::vector<double>& v) {
  std::printf("  %-10s", name);
  for (double e : v) std::printf(" %10.3f", e);
  std::printf("\n");
}

std::vector<double> column(const Batch& t, int f) {
  std::vector<double> v(kSamples);
  for (int n = 0; n < kSamples; ++n) v[std::size_t(n)] = t(n, f);
  return v;
}

/// A histogram as rows of '#', one row per bin, over [lo, hi).
std::vector<std::string> histogram(const std::vector<double>& v, double lo, double hi, int bins) {
  std::vector<int> count(std::size_t(bins), 0);
  for (double e : v) {
    const int b = std::clamp(int((e - lo) / (hi - lo) * bins), 0, bins - 1);
    ++count[std::size_t(b)];
  }
  std::vector<std::string> rows;
  for (int b = 0; b < bins; ++b) {
    char label[64];
    std::snprintf(label, sizeof label, "%8.2f..%-8.2f ", lo + (hi - lo) * b / bins,
                  lo + (hi - lo) * (b + 1) / bins);
    rows.push_back(label + std::string(std::size_t(count[std::size_t(b)]), '#'));
  }
  return rows;
}

}  // namespace

int main() {
  Batch x(kSamples, kFeatures);
  x.setValues({{-0.96, 15.85, 23.19, 25.19},
               {-1.71, 13.96, 21.25, 27.30},
               {-2.76, 9.92, 14.74, 36.08},
               {2.25, 13.01, 16.39, 31.11},
               {-2.88, 11.44, 17.65, 28.10},
               {-1.42, 9.79, 9.10, 33.09},
               {4.48, 14.81, 20.23, 28.16},
               {2.09, 13.21, 17.62, 35.79}});

  std::printf("bnorm demo: one training step of BatchNorm1d(%d) on a batch of %d samples\n",
              kFeatures, kSamples);
  table("Input x: every feature has its own mean and scale", x);

  bnorm::BatchNorm1d<double> bn(kFeatures);  // PyTorch's defaults: eps 1e-5, momentum 0.1
  bn.weight().setValues({1.0, 2.0, 0.5, 1.0});
  bn.bias().setValues({0.0, 1.0, -1.0, 5.0});

  // The statistics of the batch, from the functional layer (the module runs the same kernels).
  std::vector<double> mean(kFeatures), invstd(kFeatures), xhat_data(std::size_t(x.size()));
  const bnorm::functional::Shape shape{kSamples, kFeatures, 1};
  bnorm::functional::forward_training<double>(shape, x.data(), xhat_data.data(), bn.options().eps,
                                              {}, {mean.data(), invstd.data()});
  std::vector<double> var(kFeatures), std_dev(kFeatures), unbiased(kFeatures);
  for (int f = 0; f < kFeatures; ++f) {
    const auto i = std::size_t(f);
    var[i] = 1 / (invstd[i] * invstd[i]) - bn.options().eps;
    std_dev[i] = std::sqrt(var[i]);
    unbiased[i] = var[i] * kSamples / (kSamples - 1);
  }
  std::printf("\nBatch statistics per feature (variance biased: it normalizes)\n");
  header();
  row("mean", mean);
  row("variance", var);
  row("std", std_dev);
  const Batch xhat = Eigen::TensorMap<Batch>(xhat_data.data(), kSamples, kFeatures);
  table("Normalized x_hat = (x - mean) / sqrt(var + eps): mean 0, variance 1 per feature", xhat);

  const Batch y = bn.forward(x);
  std::printf("\nLearnable parameters\n");
  header();
  auto values = [](const Eigen::Tensor<double, 1>& t) {
    return std::vector<double>(t.data(), t.data() + t.size());
  };
  row("gamma", values(bn.weight()));
  row("beta", values(bn.bias()));
  table("Output y = gamma * x_hat + beta (training mode)", y);

  std::printf("\nRunning statistics after the step: (1 - 0.1) * initial + 0.1 * batch value,\n"
              "with the UNBIASED variance (var * n / (n - 1)) as PyTorch does\n");
  header();
  row("unbiased", unbiased);
  row("run. mean", values(bn.running_mean()));
  row("run. var", values(bn.running_var()));
  std::printf("  num_batches_tracked = %lld\n", static_cast<long long>(bn.num_batches_tracked()));

  bn.eval();
  const Batch y_eval = bn.forward(x);
  table("Eval mode: the same batch normalized with the running statistics instead\n"
        "(after one step they are still close to the initial 0 and 1, so the output is not "
        "normalized yet)",
        y_eval);

  std::printf("\nDistribution of each feature, before and after normalization\n");
  for (int f = 0; f < kFeatures; ++f) {
    const auto before = column(x, f), after = column(xhat, f);
    const auto [lo, hi] = std::minmax_element(before.begin(), before.end());
    const auto left = histogram(before, *lo, *hi + 1e-9, 5);
    const auto right = histogram(after, -2.0, 2.0, 5);
    double m = 0, sq = 0;
    for (double e : after) m += e / kSamples;
    for (double e : after) sq += (e - m) * (e - m) / kSamples;
    std::printf("\n  feature %d: mean %.2f, std %.2f  ->  mean %.2f, std %.2f\n", f,
                mean[std::size_t(f)], std_dev[std::size_t(f)], std::abs(m), std::sqrt(sq));
    for (std::size_t b = 0; b < left.size(); ++b)
      std::printf("    %-32s | %s\n", left[b].c_str(), right[b].c_str());
  }
  return 0;
}

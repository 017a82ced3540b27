// What batch norm buys, on bnorm: a small MLP (Linear, BatchNorm1d, ReLU, twice, then Linear)
// learns two interleaved spirals with and without batch norm, at learning rates 0.01, 0.1 and
// 1.0, by plain minibatch SGD from the same initial weights. Activations are column-major
// Eigen::MatrixXf (samples by features), as Eigen users hold them; BatchNorm1d takes them with
// no copy. Each epoch ends with an evaluation on a held-out split, in which the batch norms use
// their running statistics (infer). Prints a table, writes the curves to a CSV for plot.py.
//
//   bnorm_train_mlp [--epochs N] [--csv FILE] [--require ACCURACY]
//
// --require: exit 1 unless every run with batch norm ends at that held-out accuracy or above.

#include <bnorm/bnorm.hpp>

#include "mlp.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace {

using example::Data;
using example::Matrix;

struct Run {
  bool batch_norm;
  float lr, init_scale;
  std::vector<float> loss, test_accuracy;  // per epoch
  int diverged_at = 0;                     // the epoch whose loss was not finite, or 0
};

Run train(bool batch_norm, float lr, float init_scale, int epochs, const Data& train_set,
          const Data& test_set) {
  std::mt19937 rng(7);  // every run starts from the same weights and sees the same batches
  example::Mlp<> net(batch_norm, init_scale, rng);
  Run run{batch_norm, lr, init_scale, {}, {}, 0};
  constexpr int kBatch = 64;
  const int n = int(train_set.x.rows());
  std::vector<int> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  Matrix xb(kBatch, 2), grad;
  std::vector<int> yb(kBatch);
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    std::shuffle(order.begin(), order.end(), rng);
    double total = 0;
    for (int start = 0; start + kBatch <= n; start += kBatch) {
      for (int i = 0; i < kBatch; ++i) {
        const int k = order[std::size_t(start + i)];
        xb.row(i) = train_set.x.row(k);
        yb[std::size_t(i)] = train_set.label[std::size_t(k)];
      }
      total += example::cross_entropy(net.forward(xb), yb, &grad);
      net.backward(grad);
      net.step(lr);
    }
    const float loss = float(total / double(n / kBatch));
    if (!std::isfinite(loss) || loss > 1e4f) {
      run.diverged_at = epoch;
      return run;
    }
    run.loss.push_back(loss);
    run.test_accuracy.push_back(example::accuracy(net.infer(test_set.x), test_set.label));
  }
  return run;
}

}  // namespace

int main(int argc, char** argv) {
  int epochs = 40;
  std::string csv = "train_mlp.csv";
  float required = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--epochs" && i + 1 < argc) epochs = std::atoi(argv[++i]);
    else if (arg == "--csv" && i + 1 < argc) csv = argv[++i];
    else if (arg == "--require" && i + 1 < argc) required = float(std::atof(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--epochs N] [--csv FILE] [--require ACCURACY]\n", argv[0]);
      return 2;
    }
  }
  if (epochs < 1) {
    std::fprintf(stderr, "expected --epochs >= 1, got %d\n", epochs);
    return 2;
  }

  std::mt19937 data_rng(2024);
  const Data train_set = example::spirals(2048, data_rng), test_set = example::spirals(1024, data_rng);
  std::vector<Run> runs;
  // Learning rates at He's initialization, then initial weights 10x smaller and larger.
  const std::pair<float, float> settings[] = {{0.01f, 1}, {0.1f, 1}, {1.0f, 1}, {0.01f, 0.1f},
                                              {0.01f, 10}};
  for (const auto& [lr, init] : settings)
    for (bool bn : {true, false}) runs.push_back(train(bn, lr, init, epochs, train_set, test_set));

  std::printf("Two spirals, 2048 training and 1024 held-out points, MLP 2-64-64-2, SGD, batch 64, "
              "%d epochs; init: the initial weights' scale, 1 = He's\n\n", epochs);
  std::printf("| batch norm | lr   | init | final loss | held-out accuracy | first epoch at 90%% |\n");
  std::printf("|------------|------|------|------------|-------------------|--------------------|\n");
  bool met = true;
  for (const Run& r : runs) {
    const char* bn = r.batch_norm ? "yes" : "no";
    std::printf("| %-10s | %-4g | %-4g | ", bn, double(r.lr), double(r.init_scale));
    if (r.diverged_at) {
      const std::string when = "diverged, epoch " + std::to_string(r.diverged_at);
      std::printf("%10s | %17s | %18s |\n", "-", when.c_str(), "never");
      met = met && !r.batch_norm;
      continue;
    }
    const auto hit = std::find_if(r.test_accuracy.begin(), r.test_accuracy.end(),
                                  [](float a) { return a >= 0.9f; });
    const std::string first =
        hit == r.test_accuracy.end() ? "never" : std::to_string(hit - r.test_accuracy.begin() + 1);
    std::printf("%10.4f | %16.1f%% | %18s |\n", double(r.loss.back()),
                100.0 * double(r.test_accuracy.back()), first.c_str());
    if (r.batch_norm && r.test_accuracy.back() < required) met = false;
  }

  std::ofstream out(csv);
  out << "batch_norm,lr,init,epoch,loss,test_accuracy\n";
  for (const Run& r : runs)
    for (std::size_t e = 0; e < r.loss.size(); ++e)
      out << int(r.batch_norm) << ',' << r.lr << ',' << r.init_scale << ',' << e + 1 << ','
          << r.loss[e] << ',' << r.test_accuracy[e] << '\n';
  if (!out) {
    std::fprintf(stderr, "could not write %s\n", csv.c_str());
    return 1;
  }
  std::printf("\nLoss curves: %s (examples/plot.py draws them)\n", csv.c_str());
  if (required >= 0 && !met) {
    std::fprintf(stderr, "a run with batch norm ended below the required %.1f%% held-out "
                 "accuracy\n", 100.0 * double(required));
    return 1;
  }
  return 0;
}

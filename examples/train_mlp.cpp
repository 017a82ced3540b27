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

using Matrix = Eigen::MatrixXf;  // samples by features, column-major
using Vector = Eigen::VectorXf;
constexpr float kPi = 3.14159265f;

struct Data {
  Matrix x;  // n x 2
  std::vector<int> label;
};

/// Two spirals of 1.5 turns each, one the other turned half a circle, with some noise, in the
/// classic form whose radius is the angle: coordinates up to about 10, as raw features come.
Data spirals(int n, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(0, 1);
  std::normal_distribution<float> noise(0, 0.3f);
  Data d{Matrix(n, 2), std::vector<int>(std::size_t(n))};
  for (int i = 0; i < n; ++i) {
    const int k = i % 2;
    const float t = std::sqrt(uniform(rng));  // uniform density along the arm's length
    const float angle = 3 * kPi * t + float(k) * kPi;
    const float radius = 3 * kPi * t;
    d.x(i, 0) = radius * std::cos(angle) + noise(rng);
    d.x(i, 1) = radius * std::sin(angle) + noise(rng);
    d.label[std::size_t(i)] = k;
  }
  return d;
}

struct Linear {
  Matrix w, grad_w, input;  // w: out x in
  Vector b, grad_b;

  Linear(int in, int out, float init_scale, std::mt19937& rng) : w(out, in), b(Vector::Zero(out)) {
    std::normal_distribution<float> normal(0, init_scale * std::sqrt(2.0f / float(in)));  // He's
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = normal(rng);
  }
  Matrix forward(const Matrix& x) {
    input = x;
    return (x * w.transpose()).rowwise() + b.transpose();
  }
  Matrix apply(const Matrix& x) const { return (x * w.transpose()).rowwise() + b.transpose(); }
  Matrix backward(const Matrix& dy) {
    grad_w = dy.transpose() * input;
    grad_b = dy.colwise().sum().transpose();
    return dy * w;
  }
  void step(float lr) {
    w -= lr * grad_w;
    b -= lr * grad_b;
  }
};

/// Linear, [BatchNorm1d], ReLU, twice, then Linear to two logits.
struct Mlp {
  static constexpr int kHidden = 64;
  Linear l1, l2, l3;
  std::optional<bnorm::BatchNorm1d<float>> bn1, bn2;
  Matrix mask1, mask2;  // where each ReLU passed its input

  Mlp(bool batch_norm, float init_scale, std::mt19937& rng)
      : l1(2, kHidden, init_scale, rng), l2(kHidden, kHidden, init_scale, rng),
        l3(kHidden, 2, init_scale, rng) {
    if (batch_norm) {
      bn1.emplace(kHidden);
      bn2.emplace(kHidden);
    }
  }

  static Matrix relu(const Matrix& h, Matrix& mask) {
    mask = (h.array() > 0).cast<float>();
    return h.cwiseProduct(mask);
  }

  Matrix forward(const Matrix& x) {
    Matrix h = l1.forward(x);
    if (bn1) h = bn1->forward(h);
    h = relu(h, mask1);
    h = l2.forward(h);
    if (bn2) h = bn2->forward(h);
    h = relu(h, mask2);
    return l3.forward(h);
  }

  /// Evaluation: the batch norms normalize with their running statistics and change nothing.
  Matrix infer(const Matrix& x) const {
    Matrix h = l1.apply(x);
    if (bn1) h = bn1->infer(h);
    h = h.cwiseMax(0.0f);
    h = l2.apply(h);
    if (bn2) h = bn2->infer(h);
    return l3.apply(h.cwiseMax(0.0f));
  }

  void backward(const Matrix& dlogits) {
    Matrix d = l3.backward(dlogits).cwiseProduct(mask2);
    if (bn2) d = bn2->backward(d);
    d = l2.backward(d).cwiseProduct(mask1);
    if (bn1) d = bn1->backward(d);
    l1.backward(d);
  }

  void step(float lr) {
    for (Linear* l : {&l1, &l2, &l3}) l->step(lr);
    for (auto* bn : {&bn1, &bn2}) {
      if (!*bn) continue;
      (*bn)->weight() -= (*bn)->grad_weight() * lr;
      (*bn)->bias() -= (*bn)->grad_bias() * lr;
      (*bn)->zero_grad();
    }
  }
};

/// Mean softmax cross-entropy of the logits, and its gradient with respect to them.
float cross_entropy(const Matrix& logits, const std::vector<int>& label, Matrix* grad) {
  const Eigen::Index n = logits.rows();
  float loss = 0;
  if (grad) grad->resize(n, logits.cols());
  for (Eigen::Index i = 0; i < n; ++i) {
    const float top = logits.row(i).maxCoeff();
    const Eigen::RowVectorXf e = (logits.row(i).array() - top).exp().matrix();
    const float sum = e.sum();
    loss -= std::log(e(label[std::size_t(i)]) / sum);
    if (grad) {
      grad->row(i) = e / sum;
      (*grad)(i, label[std::size_t(i)]) -= 1;
    }
  }
  if (grad) *grad /= float(n);
  return loss / float(n);
}

float accuracy(const Matrix& logits, const std::vector<int>& label) {
  int right = 0;
  for (Eigen::Index i = 0; i < logits.rows(); ++i)
    right += int((logits(i, 1) > logits(i, 0)) == (label[std::size_t(i)] == 1));
  return float(right) / float(logits.rows());
}

struct Run {
  bool batch_norm;
  float lr, init_scale;
  std::vector<float> loss, test_accuracy;  // per epoch
  int diverged_at = 0;                     // the epoch whose loss was not finite, or 0
};

Run train(bool batch_norm, float lr, float init_scale, int epochs, const Data& train_set,
          const Data& test_set) {
  std::mt19937 rng(7);  // every run starts from the same weights and sees the same batches
  Mlp net(batch_norm, init_scale, rng);
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
      total += cross_entropy(net.forward(xb), yb, &grad);
      net.backward(grad);
      net.step(lr);
    }
    const float loss = float(total / double(n / kBatch));
    if (!std::isfinite(loss) || loss > 1e4f) {
      run.diverged_at = epoch;
      return run;
    }
    run.loss.push_back(loss);
    run.test_accuracy.push_back(accuracy(net.infer(test_set.x), test_set.label));
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
  const Data train_set = spirals(2048, data_rng), test_set = spirals(1024, data_rng);
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

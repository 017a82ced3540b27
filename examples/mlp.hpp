#pragma once
// The examples' small network: two spirals to tell apart, a Linear layer, an MLP of Linear,
// batch norm and ReLU layers, softmax cross-entropy and accuracy. Activations are column-major
// Eigen::MatrixXf (samples by features), as Eigen users hold them; BatchNorm1d takes them with
// no copy.

#include <bnorm/bnorm.hpp>

#include <cmath>
#include <optional>
#include <random>
#include <vector>

namespace example {

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

/// Linear, [BN], ReLU, twice, then Linear to two logits. BN: BatchNorm1d<float> or
/// SyncBatchNorm1d<float>, made from kHidden and bn_args.
template <class BN = bnorm::BatchNorm1d<float>>
struct Mlp {
  static constexpr int kHidden = 64;
  Linear l1, l2, l3;
  std::optional<BN> bn1, bn2;
  Matrix mask1, mask2;  // where each ReLU passed its input

  template <class... BnArgs>
  Mlp(bool batch_norm, float init_scale, std::mt19937& rng, BnArgs&... bn_args)
      : l1(2, kHidden, init_scale, rng), l2(kHidden, kHidden, init_scale, rng),
        l3(kHidden, 2, init_scale, rng) {
    if (batch_norm) {
      bn1.emplace(kHidden, bn_args...);
      bn2.emplace(kHidden, bn_args...);
    }
  }

  /// fn(data, size) on each parameter's gradient: where data parallelism sums them over ranks.
  template <class Fn>
  void for_each_gradient(Fn fn) {
    for (Linear* l : {&l1, &l2, &l3}) {
      fn(l->grad_w.data(), l->grad_w.size());
      fn(l->grad_b.data(), l->grad_b.size());
    }
    for (auto* bn : {&bn1, &bn2}) {
      if (!*bn) continue;
      fn((*bn)->grad_weight().data(), (*bn)->grad_weight().size());
      fn((*bn)->grad_bias().data(), (*bn)->grad_bias().size());
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

}  // namespace example

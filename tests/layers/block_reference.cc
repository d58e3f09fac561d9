#include "tests/layers/block_reference.h"

#include <cmath>

#include "glog/logging.h"

namespace tp {
namespace block_ref {
namespace {

const Vec& Get(const Params& p, const std::string& name) {
  auto it = p.find(name);
  CHECK(it != p.end()) << "reference: no parameter " << name;
  return it->second;
}

Vec* GetGrad(Params* g, const std::string& name) {
  auto it = g->find(name);
  CHECK(it != g->end()) << "reference: no gradient " << name;
  return &it->second;
}

const Vec kEmpty;

const Vec& Bias(const Params& p, const std::string& name, const Dims& d) {
  return d.bias ? Get(p, name) : kEmpty;
}

Vec* BiasGrad(Params* g, const std::string& name, const Dims& d) {
  return d.bias ? GetGrad(g, name) : nullptr;
}

Vec AddVec(const Vec& a, const Vec& b) {
  CHECK_EQ(a.size(), b.size());
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] + b[i];
  return r;
}

}  // namespace

Vec Linear(const Vec& x, int64_t T, int64_t in, const Vec& w, int64_t out,
           const Vec& b) {
  CHECK_EQ(static_cast<int64_t>(x.size()), T * in);
  CHECK_EQ(static_cast<int64_t>(w.size()), out * in);
  Vec y(T * out, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < in; ++i) s += x[t * in + i] * w[o * in + i];
      y[t * out + o] = s;
    }
  }
  return y;
}

Vec LinearBackward(const Vec& dy, const Vec& x, int64_t T, int64_t in,
                   const Vec& w, int64_t out, Vec* dw, Vec* db) {
  CHECK_EQ(static_cast<int64_t>(dy.size()), T * out);
  Vec dx(T * in, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      const double g = dy[t * out + o];
      for (int64_t i = 0; i < in; ++i) {
        dx[t * in + i] += g * w[o * in + i];
        (*dw)[o * in + i] += g * x[t * in + i];
      }
      if (db != nullptr && !db->empty()) (*db)[o] += g;
    }
  }
  return dx;
}

double Gelu(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}

double GeluGrad(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  const double u = c * (x + 0.044715 * x * x * x);
  const double th = std::tanh(u);
  const double du = c * (1.0 + 3.0 * 0.044715 * x * x);
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

double SiluGrad(double x) {
  const double s = 1.0 / (1.0 + std::exp(-x));
  return s * (1.0 + x * (1.0 - s));
}

Vec LayerNorm(const Vec& x, int64_t T, int64_t N, const Vec& gamma,
              const Vec& beta, double eps) {
  Vec y(T * N);
  for (int64_t t = 0; t < T; ++t) {
    double mean = 0;
    for (int64_t i = 0; i < N; ++i) mean += x[t * N + i];
    mean /= N;
    double var = 0;
    for (int64_t i = 0; i < N; ++i) {
      var += (x[t * N + i] - mean) * (x[t * N + i] - mean);
    }
    var /= N;
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t i = 0; i < N; ++i) {
      y[t * N + i] = (x[t * N + i] - mean) * rstd * gamma[i] +
                     (beta.empty() ? 0.0 : beta[i]);
    }
  }
  return y;
}

Vec LayerNormBackward(const Vec& dy, const Vec& x, int64_t T, int64_t N,
                      const Vec& gamma, double eps, Vec* dgamma, Vec* dbeta) {
  Vec dx(T * N);
  for (int64_t t = 0; t < T; ++t) {
    double mean = 0;
    for (int64_t i = 0; i < N; ++i) mean += x[t * N + i];
    mean /= N;
    double var = 0;
    for (int64_t i = 0; i < N; ++i) {
      var += (x[t * N + i] - mean) * (x[t * N + i] - mean);
    }
    var /= N;
    const double rstd = 1.0 / std::sqrt(var + eps);
    // xhat_i = (x_i - mean) rstd; y_i = xhat_i g_i + b_i.
    // dx_i = rstd (dxhat_i - mean(dxhat) - xhat_i mean(dxhat * xhat)).
    double m1 = 0, m2 = 0;
    for (int64_t i = 0; i < N; ++i) {
      const double xhat = (x[t * N + i] - mean) * rstd;
      const double dxhat = dy[t * N + i] * gamma[i];
      m1 += dxhat;
      m2 += dxhat * xhat;
      (*dgamma)[i] += dy[t * N + i] * xhat;
      if (dbeta != nullptr && !dbeta->empty()) (*dbeta)[i] += dy[t * N + i];
    }
    m1 /= N;
    m2 /= N;
    for (int64_t i = 0; i < N; ++i) {
      const double xhat = (x[t * N + i] - mean) * rstd;
      const double dxhat = dy[t * N + i] * gamma[i];
      dx[t * N + i] = rstd * (dxhat - m1 - xhat * m2);
    }
  }
  return dx;
}

Vec RmsNorm(const Vec& x, int64_t T, int64_t N, const Vec& gamma, double eps) {
  Vec y(T * N);
  for (int64_t t = 0; t < T; ++t) {
    double ms = 0;
    for (int64_t i = 0; i < N; ++i) ms += x[t * N + i] * x[t * N + i];
    ms /= N;
    const double rstd = 1.0 / std::sqrt(ms + eps);
    for (int64_t i = 0; i < N; ++i) y[t * N + i] = x[t * N + i] * rstd * gamma[i];
  }
  return y;
}

Vec RmsNormBackward(const Vec& dy, const Vec& x, int64_t T, int64_t N,
                    const Vec& gamma, double eps, Vec* dgamma) {
  Vec dx(T * N);
  for (int64_t t = 0; t < T; ++t) {
    double ms = 0;
    for (int64_t i = 0; i < N; ++i) ms += x[t * N + i] * x[t * N + i];
    ms /= N;
    const double rstd = 1.0 / std::sqrt(ms + eps);
    // y_i = x_i r g_i, r = (ms + eps)^-1/2, dr/dx_j = -r^3 x_j / N.
    double dot = 0;  // sum_i dy_i g_i x_i
    for (int64_t i = 0; i < N; ++i) {
      dot += dy[t * N + i] * gamma[i] * x[t * N + i];
      (*dgamma)[i] += dy[t * N + i] * x[t * N + i] * rstd;
    }
    for (int64_t j = 0; j < N; ++j) {
      dx[t * N + j] = dy[t * N + j] * gamma[j] * rstd -
                      dot * rstd * rstd * rstd * x[t * N + j] / N;
    }
  }
  return dx;
}

std::map<std::string, std::vector<int64_t>> AttentionShapes(
    const Dims& d, const std::string& prefix) {
  std::map<std::string, std::vector<int64_t>> s;
  const int64_t q = d.heads * d.head_dim;
  const int64_t qkv = (d.heads + 2 * d.kv_heads) * d.head_dim;
  s[prefix + "qkv_proj.weight"] = {qkv, d.hidden};
  s[prefix + "o_proj.weight"] = {d.hidden, q};
  if (d.bias) {
    s[prefix + "qkv_proj.bias"] = {qkv};
    s[prefix + "o_proj.bias"] = {d.hidden};
  }
  return s;
}

std::map<std::string, std::vector<int64_t>> MlpShapes(
    const Dims& d, const std::string& prefix) {
  std::map<std::string, std::vector<int64_t>> s;
  const std::string in = d.swiglu ? "gate_up_proj." : "up_proj.";
  const int64_t f = d.swiglu ? 2 * d.ffn : d.ffn;
  s[prefix + in + "weight"] = {f, d.hidden};
  s[prefix + "down_proj.weight"] = {d.hidden, d.ffn};
  if (d.bias) {
    s[prefix + in + "bias"] = {f};
    s[prefix + "down_proj.bias"] = {d.hidden};
  }
  return s;
}

std::map<std::string, std::vector<int64_t>> NormShapes(
    const Dims& d, const std::string& prefix) {
  std::map<std::string, std::vector<int64_t>> s;
  s[prefix + "weight"] = {d.hidden};
  if (!d.rms_norm) s[prefix + "bias"] = {d.hidden};
  return s;
}

std::map<std::string, std::vector<int64_t>> BlockShapes(
    const Dims& d, const std::string& prefix) {
  std::map<std::string, std::vector<int64_t>> s;
  for (auto& kv : NormShapes(d, prefix + "input_norm.")) s.insert(kv);
  for (auto& kv : AttentionShapes(d, prefix + "attention.")) s.insert(kv);
  for (auto& kv : NormShapes(d, prefix + "post_attention_norm.")) s.insert(kv);
  for (auto& kv : MlpShapes(d, prefix + "mlp.")) s.insert(kv);
  return s;
}

namespace {

// Column of query head h / key head c / value head c inside a qkv_proj row.
struct QkvIndex {
  int64_t g, hd, width;
  int64_t Q(int64_t h) const { return ((h / g) * (g + 2) + h % g) * hd; }
  int64_t K(int64_t c) const { return (c * (g + 2) + g) * hd; }
  int64_t V(int64_t c) const { return (c * (g + 2) + g + 1) * hd; }
};

// Projections and attention probabilities of one forward pass.
struct AttnCache {
  Vec qkv;  // [T, (heads + 2 kv_heads) * hd]
  Vec p;    // [batch, heads, seq, seq]
  Vec o;    // [T, heads * hd] (before o_proj)
};

AttnCache AttentionCore(const Params& p, const std::string& pre,
                        const Dims& d, const Vec& x) {
  const int64_t T = d.tokens(), H = d.hidden, hd = d.head_dim;
  CHECK_EQ(d.heads % d.kv_heads, 0);
  const int64_t qw = d.heads * hd;
  const QkvIndex ix{d.heads / d.kv_heads, hd, (d.heads + 2 * d.kv_heads) * hd};
  AttnCache c;
  c.qkv = Linear(x, T, H, Get(p, pre + "qkv_proj.weight"), ix.width,
                 Bias(p, pre + "qkv_proj.bias", d));
  const int64_t S = d.seq;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  c.p.assign(d.batch * d.heads * S * S, 0.0);
  c.o.assign(T * qw, 0.0);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.heads; ++h) {
      const int64_t kh = h / ix.g;
      for (int64_t i = 0; i < S; ++i) {
        double* prow = &c.p[((b * d.heads + h) * S + i) * S];
        const double* q = &c.qkv[(b * S + i) * ix.width + ix.Q(h)];
        double mx = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = &c.qkv[(b * S + j) * ix.width + ix.K(kh)];
          double s = 0;
          for (int64_t e = 0; e < hd; ++e) s += q[e] * k[e];
          prow[j] = s * scale;
          mx = std::max(mx, prow[j]);
        }
        double z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          prow[j] = std::exp(prow[j] - mx);
          z += prow[j];
        }
        for (int64_t j = 0; j <= i; ++j) prow[j] /= z;
        for (int64_t e = 0; e < hd; ++e) {
          double s = 0;
          for (int64_t j = 0; j <= i; ++j) {
            s += prow[j] * c.qkv[(b * S + j) * ix.width + ix.V(kh) + e];
          }
          c.o[(b * S + i) * qw + h * hd + e] = s;
        }
      }
    }
  }
  return c;
}

}  // namespace

Vec Attention(const Params& p, const std::string& pre, const Dims& d,
              const Vec& x) {
  AttnCache c = AttentionCore(p, pre, d, x);
  return Linear(c.o, d.tokens(), d.heads * d.head_dim,
                Get(p, pre + "o_proj.weight"), d.hidden,
                Bias(p, pre + "o_proj.bias", d));
}

Vec AttentionBackward(const Params& p, const std::string& pre, const Dims& d,
                      const Vec& x, const Vec& dy, Params* g) {
  AttnCache c = AttentionCore(p, pre, d, x);
  const int64_t T = d.tokens(), H = d.hidden, hd = d.head_dim, S = d.seq;
  const int64_t qw = d.heads * hd;
  const QkvIndex ix{d.heads / d.kv_heads, hd, (d.heads + 2 * d.kv_heads) * hd};
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  Vec d_o = LinearBackward(dy, c.o, T, qw, Get(p, pre + "o_proj.weight"), H,
                           GetGrad(g, pre + "o_proj.weight"),
                           BiasGrad(g, pre + "o_proj.bias", d));
  Vec dqkv(T * ix.width, 0.0);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.heads; ++h) {
      const int64_t kh = h / ix.g;
      for (int64_t i = 0; i < S; ++i) {
        const double* prow = &c.p[((b * d.heads + h) * S + i) * S];
        const double* dout = &d_o[(b * S + i) * qw + h * hd];
        // dp_j = do . v_j ; dv_j += p_j do.
        Vec dp(i + 1, 0.0);
        for (int64_t j = 0; j <= i; ++j) {
          const int64_t row = (b * S + j) * ix.width;
          for (int64_t e = 0; e < hd; ++e) {
            dp[j] += dout[e] * c.qkv[row + ix.V(kh) + e];
            dqkv[row + ix.V(kh) + e] += prow[j] * dout[e];
          }
        }
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) dot += dp[j] * prow[j];
        const int64_t qrow = (b * S + i) * ix.width;
        for (int64_t j = 0; j <= i; ++j) {
          const double ds = prow[j] * (dp[j] - dot) * scale;
          const int64_t krow = (b * S + j) * ix.width;
          for (int64_t e = 0; e < hd; ++e) {
            dqkv[qrow + ix.Q(h) + e] += ds * c.qkv[krow + ix.K(kh) + e];
            dqkv[krow + ix.K(kh) + e] += ds * c.qkv[qrow + ix.Q(h) + e];
          }
        }
      }
    }
  }
  return LinearBackward(dqkv, x, T, H, Get(p, pre + "qkv_proj.weight"),
                        ix.width, GetGrad(g, pre + "qkv_proj.weight"),
                        BiasGrad(g, pre + "qkv_proj.bias", d));
}

namespace {

// Pre-activation of the MLP: [T, ffn] (GeLU) or [T, 2 ffn] interleaved
// gate/up (SwiGLU), and the activation [T, ffn].
void MlpHidden(const Params& p, const std::string& pre, const Dims& d,
               const Vec& x, Vec* pre_act, Vec* act) {
  const int64_t T = d.tokens(), H = d.hidden, F = d.ffn;
  if (d.swiglu) {
    *pre_act = Linear(x, T, H, Get(p, pre + "gate_up_proj.weight"), 2 * F,
                      Bias(p, pre + "gate_up_proj.bias", d));
    act->assign(T * F, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < F; ++i) {
        const double gate = (*pre_act)[t * 2 * F + 2 * i];
        const double up = (*pre_act)[t * 2 * F + 2 * i + 1];
        (*act)[t * F + i] = Silu(gate) * up;
      }
    }
  } else {
    *pre_act = Linear(x, T, H, Get(p, pre + "up_proj.weight"), F,
                      Bias(p, pre + "up_proj.bias", d));
    act->assign(T * F, 0.0);
    for (int64_t i = 0; i < T * F; ++i) (*act)[i] = Gelu((*pre_act)[i]);
  }
}

}  // namespace

Vec Mlp(const Params& p, const std::string& pre, const Dims& d, const Vec& x) {
  Vec pre_act, act;
  MlpHidden(p, pre, d, x, &pre_act, &act);
  return Linear(act, d.tokens(), d.ffn, Get(p, pre + "down_proj.weight"),
                d.hidden, Bias(p, pre + "down_proj.bias", d));
}

Vec MlpBackward(const Params& p, const std::string& pre, const Dims& d,
                const Vec& x, const Vec& dy, Params* g) {
  const int64_t T = d.tokens(), H = d.hidden, F = d.ffn;
  Vec pre_act, act;
  MlpHidden(p, pre, d, x, &pre_act, &act);
  Vec dact = LinearBackward(dy, act, T, F, Get(p, pre + "down_proj.weight"), H,
                            GetGrad(g, pre + "down_proj.weight"),
                            BiasGrad(g, pre + "down_proj.bias", d));
  if (d.swiglu) {
    Vec dpre(T * 2 * F);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < F; ++i) {
        const double gate = pre_act[t * 2 * F + 2 * i];
        const double up = pre_act[t * 2 * F + 2 * i + 1];
        dpre[t * 2 * F + 2 * i] = dact[t * F + i] * up * SiluGrad(gate);
        dpre[t * 2 * F + 2 * i + 1] = dact[t * F + i] * Silu(gate);
      }
    }
    return LinearBackward(dpre, x, T, H, Get(p, pre + "gate_up_proj.weight"),
                          2 * F, GetGrad(g, pre + "gate_up_proj.weight"),
                          BiasGrad(g, pre + "gate_up_proj.bias", d));
  }
  Vec dpre(T * F);
  for (int64_t i = 0; i < T * F; ++i) dpre[i] = dact[i] * GeluGrad(pre_act[i]);
  return LinearBackward(dpre, x, T, H, Get(p, pre + "up_proj.weight"), F,
                        GetGrad(g, pre + "up_proj.weight"),
                        BiasGrad(g, pre + "up_proj.bias", d));
}

namespace {

Vec Norm(const Params& p, const std::string& pre, const Dims& d,
         const Vec& x) {
  if (d.rms_norm) {
    return RmsNorm(x, d.tokens(), d.hidden, Get(p, pre + "weight"), d.eps);
  }
  return LayerNorm(x, d.tokens(), d.hidden, Get(p, pre + "weight"),
                   Get(p, pre + "bias"), d.eps);
}

Vec NormBackward(const Params& p, const std::string& pre, const Dims& d,
                 const Vec& x, const Vec& dy, Params* g) {
  if (d.rms_norm) {
    return RmsNormBackward(dy, x, d.tokens(), d.hidden, Get(p, pre + "weight"),
                           d.eps, GetGrad(g, pre + "weight"));
  }
  return LayerNormBackward(dy, x, d.tokens(), d.hidden, Get(p, pre + "weight"),
                           d.eps, GetGrad(g, pre + "weight"),
                           GetGrad(g, pre + "bias"));
}

}  // namespace

Vec Block(const Params& p, const std::string& pre, const Dims& d,
          const Vec& x) {
  Vec n1 = Norm(p, pre + "input_norm.", d, x);
  Vec h = AddVec(x, Attention(p, pre + "attention.", d, n1));
  Vec n2 = Norm(p, pre + "post_attention_norm.", d, h);
  return AddVec(h, Mlp(p, pre + "mlp.", d, n2));
}

Vec BlockBackward(const Params& p, const std::string& pre, const Dims& d,
                  const Vec& x, const Vec& dy, Params* g) {
  Vec n1 = Norm(p, pre + "input_norm.", d, x);
  Vec h = AddVec(x, Attention(p, pre + "attention.", d, n1));
  Vec n2 = Norm(p, pre + "post_attention_norm.", d, h);
  // y = h + mlp(n2(h)).
  Vec dn2 = MlpBackward(p, pre + "mlp.", d, n2, dy, g);
  Vec dh = AddVec(dy, NormBackward(p, pre + "post_attention_norm.", d, h, dn2,
                                   g));
  // h = x + attn(n1(x)).
  Vec dn1 = AttentionBackward(p, pre + "attention.", d, n1, dh, g);
  return AddVec(dh, NormBackward(p, pre + "input_norm.", d, x, dn1, g));
}

Params ZerosLike(const Params& p) {
  Params z;
  for (const auto& kv : p) z[kv.first] = Vec(kv.second.size(), 0.0);
  return z;
}

}  // namespace block_ref
}  // namespace tp

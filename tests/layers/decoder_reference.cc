#include "tests/layers/decoder_reference.h"

#include <algorithm>
#include <cmath>

#include "glog/logging.h"

namespace tp {
namespace decoder_ref {
namespace {

const Vec& Get(const Params& p, const std::string& name) {
  auto it = p.find(name);
  CHECK(it != p.end()) << "reference: missing parameter " << name;
  return it->second;
}

bool Has(const Params& p, const std::string& name) { return p.count(name) > 0; }

// y [T, out] = x [T, in] w^T (+ b).
Vec Linear(const Vec& x, int64_t T, int64_t in, const Params& p,
           const std::string& name, int64_t out) {
  const Vec& w = Get(p, name + ".weight");
  CHECK_EQ(static_cast<int64_t>(w.size()), out * in) << name;
  const bool has_b = Has(p, name + ".bias");
  Vec y(T * out, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double s = has_b ? Get(p, name + ".bias")[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) s += x[t * in + i] * w[o * in + i];
      y[t * out + o] = s;
    }
  }
  return y;
}

Vec Norm(const Vec& x, int64_t T, int64_t H, const Params& p,
         const std::string& name, const Config& c) {
  const Vec& w = Get(p, name + ".weight");
  Vec y(x.size());
  for (int64_t t = 0; t < T; ++t) {
    const double* r = x.data() + t * H;
    if (c.rms_norm) {
      double ms = 0;
      for (int64_t i = 0; i < H; ++i) ms += r[i] * r[i];
      ms /= H;
      const double inv = 1.0 / std::sqrt(ms + c.eps);
      for (int64_t i = 0; i < H; ++i) y[t * H + i] = r[i] * inv * w[i];
    } else {
      const Vec& b = Get(p, name + ".bias");
      double mean = 0;
      for (int64_t i = 0; i < H; ++i) mean += r[i];
      mean /= H;
      double var = 0;
      for (int64_t i = 0; i < H; ++i) var += (r[i] - mean) * (r[i] - mean);
      var /= H;
      const double inv = 1.0 / std::sqrt(var + c.eps);
      for (int64_t i = 0; i < H; ++i) {
        y[t * H + i] = (r[i] - mean) * inv * w[i] + b[i];
      }
    }
  }
  return y;
}

// Rotates each head of x [T, heads * d] in place; row t is position t % seq.
void Rope(Vec& x, int64_t T, int64_t heads, int64_t d, int64_t seq,
          double theta) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < T; ++t) {
    const double pos = static_cast<double>(t % seq);
    for (int64_t h = 0; h < heads; ++h) {
      double* v = x.data() + t * heads * d + h * d;
      for (int64_t i = 0; i < half; ++i) {
        const double ang = pos / std::pow(theta, 2.0 * i / d);
        const double a = v[i], b = v[i + half];
        v[i] = a * std::cos(ang) - b * std::sin(ang);
        v[i + half] = b * std::cos(ang) + a * std::sin(ang);
      }
    }
  }
}

double Gelu(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

double Silu(double x) { return x / (1.0 + std::exp(-x)); }

}  // namespace

Vec Logits(const Params& p, const Config& c, const std::vector<int64_t>& ids,
           int64_t B, int64_t S) {
  const int64_t T = B * S, H = c.hidden, d = c.head_dim;
  const int64_t nh = c.heads, nkv = c.kv_heads, g = nh / nkv;
  const Vec& emb = Get(p, "model.embed_tokens.weight");
  Vec h(T * H);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < H; ++i) h[t * H + i] = emb[ids[t] * H + i];
  }
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l);
    const Vec n1 = Norm(h, T, H, p, pre + ".input_layernorm", c);
    Vec q = Linear(n1, T, H, p, pre + ".self_attn.q_proj", nh * d);
    Vec k = Linear(n1, T, H, p, pre + ".self_attn.k_proj", nkv * d);
    const Vec v = Linear(n1, T, H, p, pre + ".self_attn.v_proj", nkv * d);
    if (c.rope) {
      Rope(q, T, nh, d, S, c.rope_theta);
      Rope(k, T, nkv, d, S, c.rope_theta);
    }
    Vec ctx(T * nh * d, 0.0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t kvh = j / g;
        for (int64_t i = 0; i < S; ++i) {
          const int64_t ti = b * S + i;
          Vec sc(i + 1);
          double mx = -1e300;
          for (int64_t s = 0; s <= i; ++s) {
            const int64_t ts = b * S + s;
            double dot = 0;
            for (int64_t e = 0; e < d; ++e) {
              dot += q[ti * nh * d + j * d + e] * k[ts * nkv * d + kvh * d + e];
            }
            sc[s] = dot / std::sqrt(static_cast<double>(d));
            mx = std::max(mx, sc[s]);
          }
          double sum = 0;
          for (int64_t s = 0; s <= i; ++s) sum += std::exp(sc[s] - mx);
          for (int64_t s = 0; s <= i; ++s) {
            const double pr = std::exp(sc[s] - mx) / sum;
            const int64_t ts = b * S + s;
            for (int64_t e = 0; e < d; ++e) {
              ctx[ti * nh * d + j * d + e] +=
                  pr * v[ts * nkv * d + kvh * d + e];
            }
          }
        }
      }
    }
    const Vec o = Linear(ctx, T, nh * d, p, pre + ".self_attn.o_proj", H);
    for (int64_t i = 0; i < T * H; ++i) h[i] += o[i];
    const Vec n2 = Norm(h, T, H, p, pre + ".post_attention_layernorm", c);
    Vec a;
    if (c.swiglu) {
      const Vec gt = Linear(n2, T, H, p, pre + ".mlp.gate_proj", c.ffn);
      const Vec up = Linear(n2, T, H, p, pre + ".mlp.up_proj", c.ffn);
      a.resize(gt.size());
      for (size_t i = 0; i < a.size(); ++i) a[i] = Silu(gt[i]) * up[i];
    } else {
      a = Linear(n2, T, H, p, pre + ".mlp.up_proj", c.ffn);
      for (double& x : a) x = Gelu(x);
    }
    const Vec m = Linear(a, T, c.ffn, p, pre + ".mlp.down_proj", H);
    for (int64_t i = 0; i < T * H; ++i) h[i] += m[i];
  }
  const Vec hn = Norm(h, T, H, p, "model.norm", c);
  return Linear(hn, T, H, p, "lm_head", c.vocab);
}

double Loss(const Params& p, const Config& c, const std::vector<int64_t>& ids,
            const std::vector<int64_t>& targets, int64_t B, int64_t S) {
  const Vec z = Logits(p, c, ids, B, S);
  const int64_t T = B * S, V = c.vocab;
  double loss = 0;
  for (int64_t t = 0; t < T; ++t) {
    double mx = -1e300;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, z[t * V + j]);
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(z[t * V + j] - mx);
    loss += mx + std::log(sum) - z[t * V + targets[t]];
  }
  return loss / T;
}

std::vector<int64_t> Generate(const Params& p, const Config& c,
                              const std::vector<int64_t>& prompt, int64_t B,
                              int64_t P, int64_t n) {
  const int64_t L = P + n;
  std::vector<int64_t> out(B * L, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < P; ++i) out[b * L + i] = prompt[b * P + i];
  }
  for (int64_t step = 0; step < n; ++step) {
    const int64_t S = P + step;
    std::vector<int64_t> ids(B * S);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < S; ++i) ids[b * S + i] = out[b * L + i];
    }
    const Vec z = Logits(p, c, ids, B, S);
    for (int64_t b = 0; b < B; ++b) {
      const double* row = z.data() + (b * S + S - 1) * c.vocab;
      int64_t best = 0;
      for (int64_t j = 1; j < c.vocab; ++j) {
        if (row[j] > row[best]) best = j;
      }
      out[b * L + S] = best;
    }
  }
  return out;
}

}  // namespace decoder_ref
}  // namespace tp

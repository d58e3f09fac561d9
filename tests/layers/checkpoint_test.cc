#include "layers/checkpoint.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "layers/parameter.h"
#include "runtime/safetensors.h"
#include "runtime/tensor.h"
#include "tests/testing/fake_communicator.h"

namespace tp {
namespace {

using ::testing::HasSubstr;

std::string TempDir(const std::string& name) {
  const char* d = std::getenv("TEST_TMPDIR");
  const std::string dir = absl::StrCat(d != nullptr ? d : "/tmp", "/", name);
  std::string cmd = absl::StrCat("rm -rf '", dir, "'");
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

std::string Bytes(const Tensor& t) {
  Tensor c = t.Contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), c.nbytes());
}

// A full (TP = 1) parameter and the dim it is split along (-1: replicated).
struct FullParam {
  std::string name;
  Tensor full;
  int split_dim;
};

// Distinct values, exact in every dtype, different for each parameter.
Tensor Values(Shape shape, DType dtype, int seed) {
  std::vector<double> v(NumElements(shape));
  for (size_t i = 0; i < v.size(); ++i) {
    v[i] =
        static_cast<double>((static_cast<int>(i) * 7 + seed * 13) % 251) - 100;
  }
  return *Tensor::FromDoubles(v, std::move(shape), dtype);
}

// Sizes divisible by 1, 2, 3, 4, 6 and 12 along their split dims.
std::vector<FullParam> Model() {
  return {
      {"model.embed_tokens.weight", Values({24, 4}, DType::kBFloat16, 1), 0},
      {"model.layers.0.self_attn.q_proj.weight",
       Values({12, 8}, DType::kFloat32, 2), 0},
      {"model.layers.0.self_attn.q_proj.bias", Values({12}, DType::kFloat32, 3),
       0},
      {"model.layers.0.self_attn.o_proj.weight",
       Values({6, 12}, DType::kFloat32, 4), 1},
      {"model.layers.0.self_attn.o_proj.bias", Values({6}, DType::kFloat32, 5),
       -1},
      {"model.norm.weight", Values({8}, DType::kFloat64, 6), -1},
      {"mlp.up.weight", Values({36, 2, 3}, DType::kFloat16, 7), 0},
      {"position_ids", Values({12}, DType::kInt64, 8), 0},
      {"step", Values({}, DType::kInt32, 9), -1},
      {"empty", Values({0, 12}, DType::kFloat32, 10), 1},
  };
}

// Rank `rank`'s shards of `model` at TP = `size`: equal pieces in rank
// order. With `zero`, the tensors are zeros of the right shape (to load
// into); otherwise copies of the full tensor's slice.
std::vector<ParameterShard> Shards(const std::vector<FullParam>& model,
                                   int rank, int size, bool zero) {
  std::vector<ParameterShard> out;
  for (const FullParam& f : model) {
    ParameterShard p;
    p.name = f.name;
    p.full_shape = f.full.shape();
    p.split_dim = f.split_dim;
    Tensor piece = f.full;
    if (f.split_dim >= 0) {
      const int64_t len = f.full.dim(f.split_dim) / size;
      p.offset = rank * len;
      piece = *f.full.Narrow(f.split_dim, p.offset, len);
    }
    p.tensor =
        zero ? Tensor::Zeros(piece.shape(), piece.dtype()) : piece.Clone();
    out.push_back(std::move(p));
  }
  return out;
}

// The expected contents of `p`: its piece of the full tensor.
std::string ExpectedBytes(const FullParam& f, const ParameterShard& p) {
  if (p.replicated()) return Bytes(f.full);
  return Bytes(
      *f.full.Narrow(p.split_dim, p.offset, p.tensor.dim(p.split_dim)));
}

void SaveAll(const std::string& dir, const std::vector<FullParam>& model,
             int size) {
  for (int r = 0; r < size; ++r) {
    absl::Status s =
        SaveShardedCheckpoint(dir, r, size, Shards(model, r, size, false));
    ASSERT_TRUE(s.ok()) << s;
  }
}

void ExpectLoads(const std::string& path, const std::vector<FullParam>& model,
                 int size) {
  for (int r = 0; r < size; ++r) {
    SCOPED_TRACE(absl::StrCat("load rank ", r, " of ", size));
    std::vector<ParameterShard> shards = Shards(model, r, size, true);
    absl::Status s = LoadShardedCheckpoint(path, r, size, shards);
    ASSERT_TRUE(s.ok()) << s;
    for (size_t i = 0; i < model.size(); ++i) {
      EXPECT_EQ(Bytes(shards[i].tensor), ExpectedBytes(model[i], shards[i]))
          << model[i].name;
    }
  }
}

TEST(CheckpointTest, SaveAtEveryTpSizeLoadsAtEveryOther) {
  const std::vector<FullParam> model = Model();
  for (int save : {1, 2, 3, 4}) {
    const std::string dir = TempDir(absl::StrCat("reshard_", save));
    SaveAll(dir, model, save);
    for (int load : {1, 2, 3, 4, 6, 12}) {
      SCOPED_TRACE(absl::StrCat("saved at TP=", save, ", loaded at TP=", load));
      ExpectLoads(dir, model, load);
    }
  }
}

TEST(CheckpointTest, FilesAreValidSafetensorsWithTheirShards) {
  const std::vector<FullParam> model = Model();
  const std::string dir = TempDir("layout");
  SaveAll(dir, model, 4);
  // Rank 1's file: its pieces of the split tensors only.
  auto f = SafetensorsFile::Open(dir + "/model-rank-1-of-4.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_FALSE((*f)->contains("model.norm.weight"));  // replicated: rank 0
  EXPECT_EQ((*f)->metadata().at("tp_rank"), "1");
  EXPECT_EQ((*f)->metadata().at("tp_size"), "4");
  Tensor q = *(*f)->Read("model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(Bytes(q), Bytes(*model[1].full.Narrow(0, 3, 3)));
  Tensor o = *(*f)->Read("model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(Bytes(o), Bytes(*model[3].full.Narrow(1, 3, 3)));
  auto f0 = SafetensorsFile::Open(dir + "/model-rank-0-of-4.safetensors");
  ASSERT_TRUE(f0.ok()) << f0.status();
  EXPECT_EQ(Bytes(*(*f0)->Read("model.norm.weight")), Bytes(model[5].full));
  // The index: Hugging Face weight_map plus our placement.
  const std::string index = ReadFile(dir + "/model.safetensors.index.json");
  EXPECT_THAT(index, HasSubstr("\"weight_map\""));
  EXPECT_THAT(index, HasSubstr("\"__tp__\""));
  EXPECT_THAT(index, HasSubstr("\"model-rank-3-of-4.safetensors\""));
  EXPECT_THAT(index, HasSubstr("\"total_size\""));
}

// The collective save builds the index from the files' own metadata; it
// must agree byte for byte with rank 0's prediction.
TEST(CheckpointTest, CollectiveSaveWritesTheSameCheckpoint) {
  const std::vector<FullParam> model = Model();
  const std::string predicted = TempDir("predicted");
  SaveAll(predicted, model, 4);
  const std::string collective = TempDir("collective");
  auto comms = FakeCommunicator::CreateGroup(4);
  std::vector<absl::Status> statuses(4);
  std::vector<std::thread> threads;
  for (int r = 0; r < 4; ++r) {
    threads.emplace_back([&, r] {
      statuses[r] = SaveShardedCheckpoint(collective, *comms[r],
                                          Shards(model, r, 4, false));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 4; ++r) ASSERT_TRUE(statuses[r].ok()) << statuses[r];
  EXPECT_EQ(ReadFile(collective + "/model.safetensors.index.json"),
            ReadFile(predicted + "/model.safetensors.index.json"));
  for (int r = 0; r < 4; ++r) {
    const std::string name = CheckpointShardFileName(r, 4);
    EXPECT_EQ(ReadFile(collective + "/" + name),
              ReadFile(predicted + "/" + name));
  }
  ExpectLoads(collective, model, 2);
}

TEST(CheckpointTest, CollectiveSaveFailsOnEveryRankWhenOneFails) {
  const std::vector<FullParam> model = Model();
  const std::string dir = TempDir("collective_fail");
  auto comms = FakeCommunicator::CreateGroup(2);
  std::vector<absl::Status> statuses(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      std::vector<ParameterShard> shards = Shards(model, r, 2, false);
      if (r == 1) shards[0].offset = 100;  // not a piece of its full shape
      statuses[r] = SaveShardedCheckpoint(dir, *comms[r], shards);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(statuses[1].code(), absl::StatusCode::kInvalidArgument)
      << statuses[1];
  EXPECT_EQ(statuses[0].code(), absl::StatusCode::kAborted) << statuses[0];
  EXPECT_THAT(std::string(statuses[0].message()), HasSubstr("1 of 2 ranks"));
  EXPECT_NE(::access((dir + "/model.safetensors.index.json").c_str(), F_OK), 0);
}

// Pieces of unequal length (written rank by rank) need the index built from
// the files; rank 0 alone cannot predict them.
TEST(CheckpointTest, UnevenPiecesIndexedFromTheFiles) {
  const std::vector<FullParam> model = {
      {"vocab", Values({12, 3}, DType::kFloat32, 1), 0},
      {"bias", Values({3}, DType::kFloat32, 2), -1}};
  const std::string dir = TempDir("uneven");
  const int64_t offsets[] = {0, 5, 10};
  const int64_t lengths[] = {5, 5, 2};
  for (int r = 0; r < 3; ++r) {
    ParameterShard v{"vocab",
                     *model[0].full.Narrow(0, offsets[r], lengths[r]),
                     {12, 3},
                     0,
                     offsets[r]};
    ParameterShard b{"bias", model[1].full, {3}, -1, 0};
    absl::Status s = SaveShardedCheckpoint(dir, r, 3, {v, b});
    if (r == 0) {
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_THAT(std::string(s.message()),
                  HasSubstr("'vocab' is not cut in 3 equal pieces"));
    } else {
      EXPECT_TRUE(s.ok()) << s;
    }
  }
  // Rank 0's file was written before its index failed.
  ASSERT_TRUE(WriteCheckpointIndex(dir, 3).ok());
  ExpectLoads(dir, model, 2);
  ExpectLoads(dir, model, 1);
}

// A plan change: saved with q split by rows, loaded split by columns, and
// replicated <-> split.
TEST(CheckpointTest, LoadsAlongAnotherSplitDim) {
  std::vector<FullParam> saved = {
      {"q", Values({12, 6}, DType::kFloat32, 1), 0},
      {"r", Values({6, 12}, DType::kFloat32, 2), -1},
      {"s", Values({12, 6}, DType::kFloat32, 3), 1}};
  const std::string dir = TempDir("plan_change");
  SaveAll(dir, saved, 3);
  std::vector<FullParam> loaded = saved;
  loaded[0].split_dim = 1;
  loaded[1].split_dim = 1;
  loaded[2].split_dim = -1;
  ExpectLoads(dir, loaded, 2);
  ExpectLoads(dir, loaded, 3);
  loaded[2].split_dim = 0;
  ExpectLoads(dir, loaded, 6);
}

// A TP = 1 Hugging Face checkpoint (one file of full tensors), sliced.
TEST(CheckpointTest, LoadsAHuggingFaceSingleFile) {
  const std::vector<FullParam> model = Model();
  const std::string dir = TempDir("hf_single");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const FullParam& f : model) tensors.emplace_back(f.name, f.full);
  tensors.emplace_back("lm_head.unused", Values({2}, DType::kFloat32, 0));
  ASSERT_TRUE(
      WriteSafetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}})
          .ok());
  ExpectLoads(dir, model, 3);                         // the directory
  ExpectLoads(dir + "/model.safetensors", model, 4);  // the file itself
}

// A Hugging Face multi-file checkpoint: an index with a weight_map only.
TEST(CheckpointTest, LoadsAHuggingFaceShardedIndex) {
  const std::vector<FullParam> model = Model();
  const std::string dir = TempDir("hf_index");
  std::vector<std::pair<std::string, Tensor>> first, second;
  std::string weight_map;
  for (size_t i = 0; i < model.size(); ++i) {
    const bool one = i % 2 == 0;
    (one ? first : second).emplace_back(model[i].name, model[i].full);
    absl::StrAppend(&weight_map, i == 0 ? "" : ",", "\"", model[i].name,
                    "\":\"",
                    one ? "model-00001-of-00002.safetensors"
                        : "model-00002-of-00002.safetensors",
                    "\"");
  }
  ASSERT_TRUE(
      WriteSafetensors(dir + "/model-00001-of-00002.safetensors", first).ok());
  ASSERT_TRUE(
      WriteSafetensors(dir + "/model-00002-of-00002.safetensors", second).ok());
  WriteFile(dir + "/model.safetensors.index.json",
            absl::StrCat(R"({"metadata":{"total_size":1},"weight_map":{)",
                         weight_map, "}}"));
  ExpectLoads(dir, model, 2);
}

// Each rank opens only the files whose pieces overlap its shards.
TEST(CheckpointTest, ReadsOnlyTheFilesThatOverlap) {
  const std::vector<FullParam> model = {
      {"w", Values({8, 4}, DType::kFloat32, 1), 0},
      {"b", Values({4}, DType::kFloat32, 2), -1}};
  const std::string dir = TempDir("overlap");
  SaveAll(dir, model, 4);
  ASSERT_EQ(::unlink((dir + "/model-rank-2-of-4.safetensors").c_str()), 0);
  ASSERT_EQ(::unlink((dir + "/model-rank-3-of-4.safetensors").c_str()), 0);
  // TP = 2 rank 0 needs rank files 0 and 1 only.
  std::vector<ParameterShard> r0 = Shards(model, 0, 2, true);
  absl::Status s = LoadShardedCheckpoint(dir, 0, 2, r0);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(Bytes(r0[0].tensor), Bytes(*model[0].full.Narrow(0, 0, 4)));
  std::vector<ParameterShard> r1 = Shards(model, 1, 2, true);
  s = LoadShardedCheckpoint(dir, 1, 2, r1);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("model-rank-2-of-4"));
}

// ---- Errors ----

class CheckpointErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = {{"w", Values({8, 4}, DType::kFloat32, 1), 0},
              {"b", Values({4}, DType::kFloat32, 2), -1}};
    dir_ = TempDir("errors");
    SaveAll(dir_, model_, 2);
  }
  absl::Status Load(std::vector<ParameterShard> shards, int rank = 0,
                    int size = 2) {
    return LoadShardedCheckpoint(dir_, rank, size, shards);
  }
  void SetIndex(const std::string& text) {
    WriteFile(dir_ + "/model.safetensors.index.json", text);
  }
  std::vector<FullParam> model_;
  std::string dir_;
};

void ExpectError(const absl::Status& s, absl::StatusCode code,
                 const std::string& part) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(part)) << s;
}

TEST_F(CheckpointErrorTest, MissingParameterIsNotFound) {
  std::vector<ParameterShard> shards = Shards(model_, 0, 2, true);
  shards[1].name = "c";
  ExpectError(Load(shards), absl::StatusCode::kNotFound,
              "no tensor 'c' in the checkpoint");
}

TEST_F(CheckpointErrorTest, DTypeMismatchNamesTheTensor) {
  std::vector<ParameterShard> shards = Shards(model_, 0, 2, true);
  shards[0].tensor = Tensor::Zeros({4, 4}, DType::kBFloat16);
  ExpectError(Load(shards), absl::StatusCode::kInvalidArgument,
              "tensor 'w': checkpoint has F32 (float32) but the parameter is "
              "bfloat16");
}

TEST_F(CheckpointErrorTest, FullShapeMismatchNamesTheTensor) {
  std::vector<ParameterShard> shards = Shards(model_, 0, 2, true);
  shards[1].full_shape = {5};
  shards[1].tensor = Tensor::Zeros({5}, DType::kFloat32);
  ExpectError(Load(shards), absl::StatusCode::kInvalidArgument,
              "tensor 'b': checkpoint has full shape [4] but the parameter's "
              "full shape is [5]");
}

TEST_F(CheckpointErrorTest, BadShardsAndRanksAreInvalidArguments) {
  std::vector<ParameterShard> shards = Shards(model_, 0, 2, true);
  shards[0].offset = 6;  // [6, 10) of 8
  ExpectError(Load(shards), absl::StatusCode::kInvalidArgument,
              "parameter 'w': tensor of shape [4, 4] at offset 6");
  shards = Shards(model_, 0, 2, true);
  shards[0].split_dim = 2;
  ExpectError(Load(shards), absl::StatusCode::kInvalidArgument,
              "split_dim 2 out of range");
  shards = Shards(model_, 0, 2, true);
  shards[1].tensor = Tensor::Zeros({3}, DType::kFloat32);
  ExpectError(Load(shards), absl::StatusCode::kInvalidArgument,
              "replicated tensor of shape [3] but full_shape [4]");
  shards = Shards(model_, 0, 2, true);
  shards[1].name = "w";
  ExpectError(Load(shards), absl::StatusCode::kInvalidArgument,
              "duplicate parameter name 'w'");
  shards = Shards(model_, 0, 2, true);
  shards[1].tensor = Tensor();
  ExpectError(Load(shards), absl::StatusCode::kFailedPrecondition,
              "parameter 'b': tensor is not materialised");
  ExpectError(Load(Shards(model_, 0, 2, true), 2, 2),
              absl::StatusCode::kInvalidArgument, "tp_rank 2 out of range");
  ExpectError(SaveShardedCheckpoint(dir_, 0, 0, {}),
              absl::StatusCode::kInvalidArgument, "tp_size 0");
}

TEST_F(CheckpointErrorTest, NoCheckpointIsNotFound) {
  ExpectError(LoadShardedCheckpoint(dir_ + "/nothing", 0, 1, {}),
              absl::StatusCode::kNotFound, "nothing");
  const std::string empty = TempDir("empty_dir");
  ExpectError(LoadShardedCheckpoint(empty, 0, 1, {}),
              absl::StatusCode::kNotFound,
              "neither model.safetensors.index.json nor model.safetensors");
}

TEST_F(CheckpointErrorTest, MalformedIndexIsInvalidArgument) {
  SetIndex("{\"__tp__\": ");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument, "invalid JSON");
  SetIndex("[1]");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument, "not a JSON object");
  SetIndex("{}");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument,
              "neither \"__tp__\" nor a \"weight_map\"");
  SetIndex(R"({"weight_map":{"w":"../etc/passwd"}})");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument,
              "weight_map entry for 'w' is not a file name");
  SetIndex(
      R"({"__tp__":{"tensors":{"w":{"dtype":"F32","full_shape":[8,4],)"
      R"("split_dim":0,"slices":[{"file":"a","offset":"0","length":4}]}}}})");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument, "tensor 'w': a slice");
  SetIndex(R"({"__tp__":{"tensors":{"w":{"dtype":"Q8","full_shape":[8,4],)"
           R"("split_dim":0,"slices":[]}}}})");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument, "'Q8'");
  SetIndex(R"({"__tp__":{"tensors":{"w":{"dtype":"F32","full_shape":[8,4],)"
           R"("split_dim":2,"slices":[]}}}})");
  ExpectError(Load(Shards(model_, 0, 2, true)),
              absl::StatusCode::kInvalidArgument, "\"split_dim\"");
}

TEST_F(CheckpointErrorTest, IndexWithGapsOrOverlapsIsDataLoss) {
  const std::string head =
      R"({"__tp__":{"tensors":{"w":{"dtype":"F32","full_shape":[8,4],)"
      R"("split_dim":0,"slices":[)";
  const std::string f0 = R"({"file":"model-rank-0-of-2.safetensors",)";
  const std::string f1 = R"({"file":"model-rank-1-of-2.safetensors",)";
  SetIndex(head + f0 + R"("offset":0,"length":4}]}}}})");
  ExpectError(Load(Shards(model_, 0, 2, true)), absl::StatusCode::kDataLoss,
              "pieces cover [0, 4) of 8");
  SetIndex(head + f0 + R"("offset":0,"length":4},)" + f1 +
           R"("offset":3,"length":4}]}}}})");
  ExpectError(Load(Shards(model_, 0, 2, true)), absl::StatusCode::kDataLoss,
              "pieces overlap");
  SetIndex(head + f0 + R"("offset":0,"length":4},)" + f1 +
           R"("offset":5,"length":3}]}}}})");
  ExpectError(Load(Shards(model_, 0, 2, true)), absl::StatusCode::kDataLoss,
              "leave a gap");
}

TEST_F(CheckpointErrorTest, FileDisagreeingWithTheIndexIsDataLoss) {
  // The index says rank 1's piece is [4, 8) but the file holds a [2, 4].
  ASSERT_TRUE(WriteSafetensors(dir_ + "/model-rank-1-of-2.safetensors",
                               {{"w", Values({2, 4}, DType::kFloat32, 0)}})
                  .ok());
  ExpectError(Load(Shards(model_, 1, 2, true), 1, 2),
              absl::StatusCode::kDataLoss,
              "tensor 'w': the index expects a F32 [4, 4] piece in");
  // A missing rank file is NotFound, naming it.
  ASSERT_EQ(::unlink((dir_ + "/model-rank-1-of-2.safetensors").c_str()), 0);
  ExpectError(Load(Shards(model_, 1, 2, true), 1, 2),
              absl::StatusCode::kNotFound, "model-rank-1-of-2.safetensors");
  ExpectError(WriteCheckpointIndex(dir_, 2), absl::StatusCode::kNotFound,
              "model-rank-1-of-2.safetensors");
}

TEST_F(CheckpointErrorTest, SaveRejectsBadParameters) {
  std::vector<ParameterShard> shards = Shards(model_, 0, 2, false);
  shards[0].full_shape = {8, 5};
  ExpectError(SaveShardedCheckpoint(dir_, 0, 2, shards),
              absl::StatusCode::kInvalidArgument,
              "parameter 'w': tensor of shape [4, 4]");
  shards = Shards(model_, 0, 2, false);
  shards[1].name = "";
  ExpectError(SaveShardedCheckpoint(dir_, 0, 2, shards),
              absl::StatusCode::kInvalidArgument, "empty name");
}

}  // namespace
}  // namespace tp

#include "runtime/tensor.h"

#include <limits>

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tp {
namespace {

using ::testing::ElementsAre;

TEST(TensorTest, NarrowIsAViewOfTheParent) {
  Tensor x = *Tensor::FromVector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor col = *x.Narrow(1, 1, 2);
  EXPECT_TRUE(col.SharesStorageWith(x));
  EXPECT_FALSE(col.is_contiguous());
  EXPECT_THAT(*col.ToVector<float>(), ElementsAre(2, 3, 5, 6));
  col.data<float>()[0] = 20;  // First element of the view is x[0][1].
  EXPECT_THAT(*x.ToVector<float>(), ElementsAre(1, 20, 3, 4, 5, 6));
}

}  // namespace
}  // namespace tp

namespace tp {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

void ExpectInvalid(const absl::Status& s, const std::vector<std::string>& parts) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  for (const std::string& p : parts) {
    EXPECT_THAT(std::string(s.message()), HasSubstr(p));
  }
}

TEST(TensorTest, EmptyHasShapeDTypeAndContiguousStrides) {
  Tensor t = Tensor::Empty({2, 3, 4}, DType::kFloat16);
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(t.strides(), (std::vector<int64_t>{12, 4, 1}));
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 48u);
  EXPECT_EQ(t.ndim(), 3);
  EXPECT_EQ(t.dim(-1), 4);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_TRUE(t.device().is_cpu());
  Tensor scalar = Tensor::Empty({}, DType::kInt64);
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(Tensor::Empty({0, 5}, DType::kFloat32).numel(), 0);
  EXPECT_FALSE(Tensor().defined());
}

TEST(TensorTest, ZerosAndFullInEveryDType) {
  for (DType dt : kAllDTypes) {
    SCOPED_TRACE(DTypeName(dt));
    EXPECT_EQ(Tensor::Zeros({2, 2}, dt).ToDoubles(), std::vector<double>(4, 0.0));
    const double want = IsFloatingPoint(dt) ? 2.5 : 2.0;  // ints truncate
    EXPECT_EQ(Tensor::Full({3}, 2.5, dt).ToDoubles(), std::vector<double>(3, want));
  }
  // 1/3 is rounded to the nearest fp16 value (0x3555).
  EXPECT_EQ(Tensor::Full({1}, 1.0 / 3, DType::kFloat16).ToDoubles()[0],
            0.333251953125);
}

TEST(TensorTest, FromVectorAndFromDoublesRejectBadCounts) {
  ExpectInvalid(Tensor::FromVector<float>({1, 2, 3}, {2, 2}).status(),
                {"FromVector", "3 values", "[2, 2]", "4 elements"});
  ExpectInvalid(Tensor::FromVector<float>({}, {2, -1}).status(),
                {"FromVector", "negative", "[2, -1]"});
  ExpectInvalid(Tensor::FromDoubles({1.0}, {2}, DType::kBFloat16).status(),
                {"1 values", "[2]"});
  auto ok = Tensor::FromVector<int32_t>({7}, {});
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->ndim(), 0);
  EXPECT_THAT(*ok->ToVector<int32_t>(), ElementsAre(7));
}

TEST(TensorTest, NarrowRejectsOutOfRangeAndAcceptsNegativeDims) {
  Tensor x = *Tensor::FromVector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  ExpectInvalid(x.Narrow(2, 0, 1).status(), {"Narrow", "dim 2", "[2, 3]"});
  ExpectInvalid(x.Narrow(-3, 0, 1).status(), {"Narrow", "dim -3"});
  ExpectInvalid(x.Narrow(1, 2, 2).status(), {"Narrow", "[2, 4)", "[2, 3]"});
  ExpectInvalid(x.Narrow(1, -1, 1).status(), {"Narrow"});
  ExpectInvalid(x.Narrow(0, 0, -1).status(), {"Narrow"});
  EXPECT_THAT(*x.Narrow(-1, 2, 1)->ToVector<float>(), ElementsAre(3, 6));
  EXPECT_THAT(*x.Narrow(0, 1, 1)->ToVector<float>(), ElementsAre(4, 5, 6));
  EXPECT_EQ(x.Narrow(1, 3, 0)->numel(), 0);
  // A view of a view keeps the original strides and offset.
  Tensor v = *x.Narrow(1, 1, 2)->Narrow(0, 1, 1);
  EXPECT_THAT(*v.ToVector<float>(), ElementsAre(5, 6));
}

TEST(TensorTest, ReshapeInfersOneDimensionAndRejectsMismatches) {
  Tensor x = *Tensor::FromVector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor r = *x.Reshape({3, -1});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  EXPECT_TRUE(r.SharesStorageWith(x));  // contiguous: a view
  EXPECT_THAT(*r.ToVector<float>(), ElementsAre(1, 2, 3, 4, 5, 6));
  EXPECT_EQ(x.Reshape({-1})->shape(), (Shape{6}));
  ExpectInvalid(x.Reshape({4, 2}).status(), {"Reshape", "[2, 3]", "[4, 2]"});
  ExpectInvalid(x.Reshape({4, -1}).status(), {"Reshape", "[4, -1]"});
  ExpectInvalid(x.Reshape({-1, -1}).status(), {"Reshape", "[-1, -1]"});
  ExpectInvalid(x.Reshape({0, -1}).status(), {"Reshape"});
  ExpectInvalid(x.Reshape({-2, 3}).status(), {"Reshape", "[-2, 3]"});
  // A strided view is copied, with its own values.
  Tensor col = *x.Narrow(1, 1, 2);
  Tensor flat = *col.Reshape({4});
  EXPECT_FALSE(flat.SharesStorageWith(x));
  EXPECT_THAT(*flat.ToVector<float>(), ElementsAre(2, 3, 5, 6));
}

TEST(TensorTest, CopyFromWritesIntoViewsAndChecksShapeAndDType) {
  Tensor dst = Tensor::Zeros({2, 4}, DType::kFloat64);
  Tensor src = *Tensor::FromVector<double>({1, 2, 3, 4}, {2, 2});
  Tensor slot = *dst.Narrow(1, 1, 2);
  ASSERT_TRUE(slot.CopyFrom(src).ok());
  EXPECT_THAT(*dst.ToVector<double>(), ElementsAre(0, 1, 2, 0, 0, 3, 4, 0));
  // Strided source into a contiguous destination.
  Tensor back = Tensor::Zeros({2, 2}, DType::kFloat64);
  ASSERT_TRUE(back.CopyFrom(slot).ok());
  EXPECT_THAT(*back.ToVector<double>(), ElementsAre(1, 2, 3, 4));
  ExpectInvalid(dst.CopyFrom(src), {"CopyFrom", "[2, 4]", "[2, 2]"});
  ExpectInvalid(back.CopyFrom(Tensor::Zeros({2, 2}, DType::kFloat32)),
                {"CopyFrom", "float64", "float32"});
}

TEST(TensorTest, CloneIsIndependentAndContiguous) {
  Tensor x = *Tensor::FromVector<int32_t>({1, 2, 3, 4}, {2, 2});
  Tensor copy = x;  // a handle to the same storage
  Tensor clone = x.Clone();
  EXPECT_TRUE(copy.SharesStorageWith(x));
  EXPECT_FALSE(clone.SharesStorageWith(x));
  clone.data<int32_t>()[0] = 100;
  copy.data<int32_t>()[1] = 200;
  EXPECT_THAT(*x.ToVector<int32_t>(), ElementsAre(1, 200, 3, 4));
  EXPECT_THAT(*clone.ToVector<int32_t>(), ElementsAre(100, 2, 3, 4));
  Tensor view_clone = x.Narrow(1, 1, 1)->Clone();
  EXPECT_TRUE(view_clone.is_contiguous());
  EXPECT_THAT(*view_clone.ToVector<int32_t>(), ElementsAre(200, 4));
  EXPECT_FALSE(Tensor().Clone().defined());
}

TEST(TensorTest, ToVectorChecksTheDType) {
  Tensor x = Tensor::Zeros({2}, DType::kFloat32);
  auto bad = x.ToVector<double>();
  ExpectInvalid(bad.status(), {"ToVector", "float32", "float64"});
  auto h = Tensor::Zeros({1}, DType::kFloat16).ToVector<Half>();
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)[0].bits, 0);
}

TEST(TensorTest, DebugStringShowsDTypeShapeDeviceAndValues) {
  Tensor x = *Tensor::FromVector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(x.DebugString(), "Tensor(float32, [2, 3], cpu) [1, 2, 3, 4, 5, 6]");
  EXPECT_EQ(x.DebugString(2), "Tensor(float32, [2, 3], cpu) [1, 2, ...]");
  EXPECT_EQ(x.Narrow(1, 1, 1)->DebugString(),
            "Tensor(float32, [2, 1], cpu) [2, 5]");
  EXPECT_EQ(Tensor().DebugString(), "Tensor(undefined)");
  EXPECT_EQ(Tensor::Full({1}, 0.5, DType::kBFloat16).DebugString(),
            "Tensor(bfloat16, [1], cpu) [0.5]");
}

TEST(TensorTest, CheckShapeAndCheckDTypeNameTheValues) {
  Tensor x = Tensor::Zeros({2, 3}, DType::kInt64);
  EXPECT_TRUE(CheckShape(x, {2, 3}, "weight").ok());
  ExpectInvalid(CheckShape(x, {3, 2}, "weight"),
                {"weight", "expected shape [3, 2]", "got [2, 3]"});
  EXPECT_TRUE(CheckDType(x, DType::kInt64, "ids").ok());
  ExpectInvalid(CheckDType(x, DType::kInt32, "ids"),
                {"ids", "expected dtype int32", "got int64"});
}

TEST(TensorTest, ToAnotherDeviceIsUnimplementedWithoutCuda) {
  Tensor x = Tensor::Zeros({1}, DType::kFloat32);
  EXPECT_TRUE(x.To(Device::Cpu())->SharesStorageWith(x));
  EXPECT_EQ(x.To(Device::Cuda(0)).status().code(),
            absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace tp

namespace tp {
namespace {

TEST(TensorTest, NarrowRejectsRangesThatWouldOverflow) {
  Tensor x = Tensor::Zeros({4}, DType::kFloat32);
  const int64_t big = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(x.Narrow(0, big, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(x.Narrow(0, 2, big).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The message names the range without overflowing start + length
  // (--config=asan's UBSan checks that).
  const std::string b = std::to_string(big);
  EXPECT_EQ(std::string(x.Narrow(0, big, 2).status().message()),
            "Tensor::Narrow: [" + b + ", " + b +
                " + 2) out of range for dim 0 of shape [4]");
  const int64_t small = std::numeric_limits<int64_t>::min();
  EXPECT_EQ(x.Narrow(0, small, -1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tp

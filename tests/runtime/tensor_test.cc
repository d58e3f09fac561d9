#include "runtime/tensor.h"

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

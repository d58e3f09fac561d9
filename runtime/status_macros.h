// Status propagation macros used across tensor_parallel.
//
//   RETURN_IF_ERROR(expr);            // returns expr's status if it is not OK
//   ASSIGN_OR_RETURN(lhs, expr);      // lhs = *expr, or returns expr's status
//
// Example:
//   absl::StatusOr<Tensor> Twice(const Tensor& x) {
//     ASSIGN_OR_RETURN(Tensor y, ops::Add(x, x));
//     RETURN_IF_ERROR(Check(y));
//     return y;
//   }
#ifndef TENSOR_PARALLEL_RUNTIME_STATUS_MACROS_H_
#define TENSOR_PARALLEL_RUNTIME_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define TP_STATUS_MACROS_CONCAT_INNER(x, y) x##y
#define TP_STATUS_MACROS_CONCAT(x, y) TP_STATUS_MACROS_CONCAT_INNER(x, y)

// Evaluates `expr` (an absl::Status) once; returns it from the enclosing
// function when it is not OK.
#define RETURN_IF_ERROR(expr)                                            \
  do {                                                                   \
    ::absl::Status tp_status_macros_status = (expr);                     \
    if (ABSL_PREDICT_FALSE(!tp_status_macros_status.ok())) {             \
      return tp_status_macros_status;                                    \
    }                                                                    \
  } while (false)

// Evaluates `rexpr` (an absl::StatusOr<T>) once; on success moves its value
// into `lhs` (which may be a declaration such as `Tensor t`), otherwise returns
// its status from the enclosing function.
#define ASSIGN_OR_RETURN(lhs, rexpr)                                      \
  TP_ASSIGN_OR_RETURN_IMPL(                                               \
      TP_STATUS_MACROS_CONCAT(tp_status_or_value_, __LINE__), lhs, rexpr)

#define TP_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                             \
  if (ABSL_PREDICT_FALSE(!statusor.ok())) {            \
    return std::move(statusor).status();               \
  }                                                    \
  lhs = std::move(statusor).value()

#endif  // TENSOR_PARALLEL_RUNTIME_STATUS_MACROS_H_

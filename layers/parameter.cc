#include "layers/parameter.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace tp {

std::vector<ParameterShard> PrefixNames(absl::string_view prefix,
                                        std::vector<ParameterShard> shards) {
  if (prefix.empty()) return shards;
  for (ParameterShard& s : shards) s.name = absl::StrCat(prefix, ".", s.name);
  return shards;
}

}  // namespace tp

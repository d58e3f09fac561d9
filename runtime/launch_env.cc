#include "runtime/launch_env.h"

#include <cstdlib>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/status_macros.h"

namespace tp {
namespace {

constexpr char kDefaultMasterAddr[] = "127.0.0.1";
constexpr int kDefaultMasterPort = 29500;

// An integer together with where it came from, for error messages:
// "LOCAL_RANK" (a variable or field) or "derived from WORLD_SIZE".
struct Value {
  int value = 0;
  std::string name;
  bool derived = false;

  std::string Describe() const {
    if (derived) return absl::StrCat(value, " (", name, ")");
    return absl::StrCat(name, "=", value);
  }
};

// The values one source provides before completion and validation.
struct Candidate {
  LaunchSource source = LaunchSource::kSingleProcess;
  Value rank;
  Value world_size;
  std::optional<Value> local_rank;
  std::optional<Value> local_world_size;
};

std::optional<std::string> Get(const EnvLookup& env, absl::string_view name) {
  std::optional<std::string> v = env(name);
  if (v.has_value() && v->empty()) return std::nullopt;
  return v;
}

absl::StatusOr<int> ParseInt(absl::string_view name, absl::string_view text) {
  int v = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, "='", text, "' is not an integer (rank discovery)"));
  }
  return v;
}

absl::StatusOr<std::optional<Value>> GetInt(const EnvLookup& env,
                                            absl::string_view name) {
  std::optional<std::string> text = Get(env, name);
  if (!text.has_value()) return std::optional<Value>();
  ASSIGN_OR_RETURN(int v, ParseInt(name, *text));
  return std::optional<Value>(Value{v, std::string(name), false});
}

std::optional<Value> FromOverride(const std::optional<int>& v,
                                  absl::string_view field) {
  if (!v.has_value()) return std::nullopt;
  return Value{*v, absl::StrCat("explicit ", field), false};
}

absl::Status BothOrNeither(const std::optional<Value>& a,
                           absl::string_view a_name,
                           const std::optional<Value>& b,
                           absl::string_view b_name) {
  if (a.has_value() && !b.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(a.value().Describe(), " is set but ", b_name,
                     " is not; a launcher sets both (rank discovery)"));
  }
  if (b.has_value() && !a.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(b.value().Describe(), " is set but ", a_name,
                     " is not; a launcher sets both (rank discovery)"));
  }
  return absl::OkStatus();
}

// Reads a (rank, size, local rank, local size) quadruple of variables.
// Returns nullopt when neither the rank nor the size variable is set.
absl::StatusOr<std::optional<Candidate>> ReadQuad(
    const EnvLookup& env, LaunchSource source, absl::string_view rank_var,
    absl::string_view size_var, absl::string_view local_rank_var,
    absl::string_view local_size_var) {
  ASSIGN_OR_RETURN(std::optional<Value> rank, GetInt(env, rank_var));
  ASSIGN_OR_RETURN(std::optional<Value> size, GetInt(env, size_var));
  if (!rank.has_value() && !size.has_value()) {
    return std::optional<Candidate>();
  }
  RETURN_IF_ERROR(BothOrNeither(rank, rank_var, size, size_var));
  Candidate c;
  c.source = source;
  c.rank = *rank;
  c.world_size = *size;
  ASSIGN_OR_RETURN(c.local_rank, GetInt(env, local_rank_var));
  ASSIGN_OR_RETURN(c.local_world_size, GetInt(env, local_size_var));
  return std::optional<Candidate>(std::move(c));
}

absl::StatusOr<std::optional<Candidate>> ReadSlurm(const EnvLookup& env) {
  ASSIGN_OR_RETURN(std::optional<Value> procid, GetInt(env, "SLURM_PROCID"));
  if (!procid.has_value()) return std::optional<Candidate>();
  ASSIGN_OR_RETURN(std::optional<Value> ntasks, GetInt(env, "SLURM_NTASKS"));
  if (!ntasks.has_value()) {
    ASSIGN_OR_RETURN(ntasks, GetInt(env, "SLURM_NPROCS"));
  }
  if (!ntasks.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        procid->Describe(),
        " is set but SLURM_NTASKS (and SLURM_NPROCS) is not; run the program "
        "with srun -n N (rank discovery)"));
  }
  Candidate c;
  c.source = LaunchSource::kSlurm;
  c.rank = *procid;
  c.world_size = *ntasks;
  ASSIGN_OR_RETURN(c.local_rank, GetInt(env, "SLURM_LOCALID"));
  ASSIGN_OR_RETURN(c.local_world_size, GetInt(env, "SLURM_NTASKS_PER_NODE"));
  if (c.local_world_size.has_value()) return std::optional<Candidate>(c);

  ASSIGN_OR_RETURN(std::optional<Value> node_id, GetInt(env, "SLURM_NODEID"));
  for (absl::string_view list_var :
       {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"}) {
    std::optional<std::string> list = Get(env, list_var);
    if (!list.has_value()) continue;
    // Without a node id only a uniform list ("4" or "4(x2)") is usable.
    const bool uniform = list->find(',') == std::string::npos;
    if (!node_id.has_value() && !uniform) continue;
    ASSIGN_OR_RETURN(
        int n, SlurmTasksOnNode(list_var, *list,
                                node_id.has_value() ? node_id->value : 0));
    c.local_world_size =
        Value{n, absl::StrCat("derived from ", list_var), true};
    break;
  }
  return std::optional<Candidate>(std::move(c));
}

// Completes the local values and checks every range.
absl::StatusOr<LaunchEnv> Finish(Candidate c) {
  const Value& rank = c.rank;
  const Value& world = c.world_size;
  if (world.value < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        world.Describe(), " is out of range: the world size must be >= 1"));
  }
  if (rank.value < 0 || rank.value >= world.value) {
    return absl::InvalidArgumentError(absl::StrCat(
        rank.Describe(), " is out of range: a rank must be in [0, ",
        world.Describe(), ")"));
  }
  if (!c.local_world_size.has_value()) {
    c.local_world_size =
        c.local_rank.has_value()
            ? Value{world.value, absl::StrCat("derived from ", world.name),
                    true}
            : Value{world.value, absl::StrCat("one node assumed: ", world.name),
                    true};
  }
  const Value& local_world = *c.local_world_size;
  if (local_world.value < 1 || local_world.value > world.value) {
    return absl::InvalidArgumentError(
        absl::StrCat(local_world.Describe(),
                     " is out of range: the local world size must be in [1, ",
                     world.Describe(), "]"));
  }
  if (!c.local_rank.has_value()) {
    c.local_rank = Value{
        rank.value % local_world.value,
        absl::StrCat("derived: ", rank.name, " % local world size"), true};
  }
  const Value& local_rank = *c.local_rank;
  if (local_rank.value < 0 || local_rank.value >= local_world.value) {
    return absl::InvalidArgumentError(absl::StrCat(
        local_rank.Describe(),
        " is out of range: a local rank must be in [0, local world size ",
        local_world.Describe(), ")"));
  }
  LaunchEnv out;
  out.rank = rank.value;
  out.world_size = world.value;
  out.local_rank = local_rank.value;
  out.local_world_size = local_world.value;
  out.source = c.source;
  return out;
}

absl::Status ResolveMaster(const LaunchOverrides& overrides,
                           const EnvLookup& env, LaunchEnv& out) {
  if (overrides.master_addr.has_value()) {
    if (absl::StripAsciiWhitespace(*overrides.master_addr).empty()) {
      return absl::InvalidArgumentError(
          "explicit master_addr is empty (rank discovery)");
    }
    out.master_addr = *overrides.master_addr;
  } else if (std::optional<std::string> addr = Get(env, "MASTER_ADDR")) {
    std::string stripped(absl::StripAsciiWhitespace(*addr));
    if (stripped.empty()) {
      return absl::InvalidArgumentError(
          "MASTER_ADDR is blank (rank discovery)");
    }
    out.master_addr = std::move(stripped);
  } else {
    out.master_addr = kDefaultMasterAddr;
  }

  std::optional<Value> port =
      FromOverride(overrides.master_port, "master_port");
  if (!port.has_value()) {
    ASSIGN_OR_RETURN(port, GetInt(env, "MASTER_PORT"));
  }
  if (!port.has_value()) {
    out.master_port = kDefaultMasterPort;
    return absl::OkStatus();
  }
  if (port->value < 1 || port->value > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        port->Describe(), " is out of range: a port must be in [1, 65535]"));
  }
  out.master_port = port->value;
  return absl::OkStatus();
}

}  // namespace

absl::string_view LaunchSourceName(LaunchSource source) {
  switch (source) {
    case LaunchSource::kExplicit:
      return "explicit";
    case LaunchSource::kTorchrun:
      return "torchrun";
    case LaunchSource::kOpenMpi:
      return "openmpi";
    case LaunchSource::kSlurm:
      return "slurm";
    case LaunchSource::kPmi:
      return "pmi";
    case LaunchSource::kSingleProcess:
      return "single_process";
  }
  return "unknown";
}

std::string LaunchEnv::DebugString() const {
  return absl::StrCat("rank ", rank, "/", world_size, " (local ", local_rank,
                      "/", local_world_size, ") master ", master_addr, ":",
                      master_port, " via ", LaunchSourceName(source));
}

EnvLookup ProcessEnvLookup() {
  return [](absl::string_view name) -> std::optional<std::string> {
    const char* v = std::getenv(std::string(name).c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  };
}

EnvLookup MapEnvLookup(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](
             absl::string_view name) -> std::optional<std::string> {
    auto it = vars.find(std::string(name));
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

absl::StatusOr<int> SlurmTasksOnNode(absl::string_view variable,
                                     absl::string_view list, int node_id) {
  auto malformed = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat(variable, "='", list, "' is malformed: ", why,
                     " (expected a list such as '2(x3),1')"));
  };
  if (node_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SLURM_NODEID=", node_id, " is out of range: must be >= 0"));
  }
  int first_node = 0;
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    item = absl::StripAsciiWhitespace(item);
    absl::string_view count_text = item;
    int repeat = 1;
    const size_t paren = item.find('(');
    if (paren != absl::string_view::npos) {
      count_text = item.substr(0, paren);
      absl::string_view rest = item.substr(paren);
      if (rest.size() < 4 || rest.substr(0, 2) != "(x" || rest.back() != ')') {
        return malformed(absl::StrCat("bad repeat '", rest, "'"));
      }
      if (!absl::SimpleAtoi(rest.substr(2, rest.size() - 3), &repeat) ||
          repeat < 1) {
        return malformed(absl::StrCat("bad repeat '", rest, "'"));
      }
    }
    int count = 0;
    if (!absl::SimpleAtoi(count_text, &count) || count < 1) {
      return malformed(absl::StrCat("bad count '", count_text, "'"));
    }
    if (node_id < first_node + repeat) return count;
    first_node += repeat;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("SLURM_NODEID=", node_id, " is out of range: ", variable,
                   "='", list, "' describes ", first_node, " nodes"));
}

absl::StatusOr<LaunchEnv> DiscoverLaunchEnv(const LaunchOverrides& overrides,
                                            const EnvLookup& env) {
  std::optional<Candidate> chosen;

  std::optional<Value> rank = FromOverride(overrides.rank, "rank");
  std::optional<Value> size = FromOverride(overrides.world_size, "world_size");
  if (rank.has_value() || size.has_value()) {
    RETURN_IF_ERROR(
        BothOrNeither(rank, "explicit rank", size, "explicit world_size"));
    Candidate c;
    c.source = LaunchSource::kExplicit;
    c.rank = *rank;
    c.world_size = *size;
    chosen = std::move(c);
  }
  if (!chosen.has_value()) {
    ASSIGN_OR_RETURN(
        chosen, ReadQuad(env, LaunchSource::kTorchrun, "RANK", "WORLD_SIZE",
                         "LOCAL_RANK", "LOCAL_WORLD_SIZE"));
  }
  if (!chosen.has_value()) {
    ASSIGN_OR_RETURN(
        chosen, ReadQuad(env, LaunchSource::kOpenMpi, "OMPI_COMM_WORLD_RANK",
                         "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                         "OMPI_COMM_WORLD_LOCAL_SIZE"));
  }
  if (!chosen.has_value()) {
    ASSIGN_OR_RETURN(chosen, ReadSlurm(env));
  }
  if (!chosen.has_value()) {
    ASSIGN_OR_RETURN(chosen,
                     ReadQuad(env, LaunchSource::kPmi, "PMI_RANK", "PMI_SIZE",
                              "MPI_LOCALRANKID", "MPI_LOCALNRANKS"));
  }
  if (!chosen.has_value()) {
    Candidate c;
    c.source = LaunchSource::kSingleProcess;
    c.rank = Value{0, "single process", true};
    c.world_size = Value{1, "single process", true};
    chosen = std::move(c);
  }

  // Explicit local values refine whichever source was chosen.
  if (std::optional<Value> v =
          FromOverride(overrides.local_rank, "local_rank")) {
    chosen->local_rank = v;
  }
  if (std::optional<Value> v =
          FromOverride(overrides.local_world_size, "local_world_size")) {
    chosen->local_world_size = v;
  }

  ASSIGN_OR_RETURN(LaunchEnv out, Finish(*std::move(chosen)));
  RETURN_IF_ERROR(ResolveMaster(overrides, env, out));
  return out;
}

}  // namespace tp

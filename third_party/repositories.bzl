"""Declares every external repository tensor_parallel needs.

Downstream workspaces call it once:

    local_repository(name = "tensor_parallel", path = "/path/to/tensor_parallel")
    load("@tensor_parallel//third_party:repositories.bzl", "tensor_parallel_deps")
    tensor_parallel_deps()

All libraries come from Debian packages installed by bootstrap.sh; nothing is
downloaded. Bazel 4.2.3 asks for rules_cc, rules_java and remote_coverage_tools
even offline, so they are declared here as small generated stubs.
"""

_RULES_CC_DEFS = """\
def cc_binary(**kwargs):
    native.cc_binary(**kwargs)

def cc_library(**kwargs):
    native.cc_library(**kwargs)

def cc_test(**kwargs):
    native.cc_test(**kwargs)

def cc_toolchain(**kwargs):
    native.cc_toolchain(**kwargs)

def cc_toolchain_suite(**kwargs):
    native.cc_toolchain_suite(**kwargs)
"""

_RULES_JAVA_DEFS = """\
def java_binary(**kwargs):
    native.java_binary(**kwargs)

def java_import(**kwargs):
    native.java_import(**kwargs)

def java_library(**kwargs):
    native.java_library(**kwargs)

def java_runtime(**kwargs):
    native.java_runtime(**kwargs)

def java_toolchain(**kwargs):
    native.java_toolchain(**kwargs)
"""

_COVERAGE_BUILD = """\
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator")

filegroup(name = "lcov_merger")
"""

def _stub_repository_impl(ctx):
    for path, content in ctx.attr.files.items():
        ctx.file(path, content)

_stub_repository = repository_rule(
    implementation = _stub_repository_impl,
    attrs = {"files": attr.string_dict()},
    doc = "A repository made of the given files (toolchain stubs for offline Bazel).",
)

def _maybe(rule, name, **kwargs):
    if name not in native.existing_rules():
        rule(name = name, **kwargs)

def tensor_parallel_deps():
    """Declares the toolchain stubs and the system libraries."""
    _maybe(
        _stub_repository,
        name = "rules_cc",
        files = {
            "WORKSPACE": "workspace(name = \"rules_cc\")\n",
            "BUILD": "",
            "cc/BUILD": "",
            "cc/defs.bzl": _RULES_CC_DEFS,
        },
    )
    _maybe(
        _stub_repository,
        name = "rules_java",
        files = {
            "WORKSPACE": "workspace(name = \"rules_java\")\n",
            "BUILD": "",
            "java/BUILD": "",
            "java/defs.bzl": _RULES_JAVA_DEFS,
        },
    )
    _maybe(
        _stub_repository,
        name = "remote_coverage_tools",
        files = {
            "WORKSPACE": "workspace(name = \"remote_coverage_tools\")\n",
            "BUILD": _COVERAGE_BUILD,
        },
    )

    # System libraries: headers are in /usr/include (found by the compiler's
    # default search path), libraries in the default linker path.
    for name in ["absl", "glog", "gtest", "gloo", "openblas", "nlohmann_json", "benchmark"]:
        _maybe(
            native.new_local_repository,
            name = name,
            path = "/usr/include",
            build_file = "@tensor_parallel//third_party:%s.BUILD" % name,
        )
    _maybe(
        native.new_local_repository,
        name = "openmpi",
        path = "/usr/lib/x86_64-linux-gnu/openmpi",
        build_file = "@tensor_parallel//third_party:openmpi.BUILD",
    )
    _maybe(
        native.new_local_repository,
        name = "cuda",
        path = "/usr/local/cuda",
        build_file = "@tensor_parallel//third_party:cuda.BUILD",
    )

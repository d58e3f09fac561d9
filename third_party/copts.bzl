"""Compiler options shared by all project code (one place)."""

# Project code builds warning-free; system headers are -isystem and exempt.
TP_COPTS = [
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
]

TP_TEST_COPTS = TP_COPTS + ["-Wno-sign-compare"]

def tp_cc_library(name, copts = [], **kwargs):
    native.cc_library(name = name, copts = TP_COPTS + copts, **kwargs)

def tp_cc_binary(name, copts = [], **kwargs):
    native.cc_binary(name = name, copts = TP_COPTS + copts, **kwargs)

def tp_cc_test(name, copts = [], deps = [], **kwargs):
    native.cc_test(
        name = name,
        copts = TP_TEST_COPTS + copts,
        deps = deps + ["@gtest//:gtest_main"],
        **kwargs
    )

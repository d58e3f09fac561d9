// A shared library that is not a backend plugin: it lacks
// tp_register_backends.
extern "C" __attribute__((visibility("default"))) int not_a_plugin() {
  return 42;
}

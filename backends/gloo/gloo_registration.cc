// Registers the Gloo backend under the name "gloo". Linking
// //backends/gloo:gloo_communicator (alwayslink) is what makes
// CreateCommunicator("gloo", ...) and "auto" on the CPU work.
#include "backends/gloo/gloo_communicator.h"
#include "comm/backend_registry.h"

namespace tp {
namespace {

const BackendRegistrar kGlooRegistrar("gloo", &CreateGlooCommunicator);

}  // namespace
}  // namespace tp

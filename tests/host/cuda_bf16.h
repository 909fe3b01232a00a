// Stands in for CUDA's header in the host emulation (tests/host/fno_host_shim.h).
#include "fno_host_shim.h"

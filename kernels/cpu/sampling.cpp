#include <cstdint>
extern "C" __attribute__((visibility("default"))) int facert_abi_version() { return 1; }

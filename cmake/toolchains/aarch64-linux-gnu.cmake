# Cross-compiles for 64-bit Arm with Debian's cross toolchain (g++-aarch64-linux-gnu) and runs
# the programs under QEMU's user-mode emulator (qemu-user): the tests then check the NEON
# kernels on an x86 machine. Eigen and Catch2 are headers, found on the build machine.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

set(BNORM_CROSS_SYSROOT /usr/aarch64-linux-gnu CACHE PATH "The target's libraries, for QEMU")
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${BNORM_CROSS_SYSROOT})

set(CMAKE_FIND_ROOT_PATH ${BNORM_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

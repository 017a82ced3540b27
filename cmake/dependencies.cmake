# Eigen 3.4 (the Tensor module) and threads: the only dependencies of the library.
# An installed Eigen is used first; without one, a pinned release is fetched (needs internet).
include(GNUInstallDirs)
find_package(Threads REQUIRED)

if(NOT TARGET Eigen3::Eigen)
  find_package(Eigen3 3.4 QUIET NO_MODULE)
endif()
if(NOT TARGET Eigen3::Eigen)
  message(STATUS "bnorm: Eigen 3.4 not found, fetching Eigen 3.4.0")
  include(FetchContent)
  FetchContent_Declare(bnorm_eigen
    URL https://gitlab.com/libeigen/eigen/-/archive/3.4.0/eigen-3.4.0.tar.gz
    URL_HASH SHA256=8586084f71f9bde545ee7fa6d00288b264a2b7ac3607b974e54d13e7162c1c72)
  FetchContent_GetProperties(bnorm_eigen)
  if(NOT bnorm_eigen_POPULATED)
    FetchContent_Populate(bnorm_eigen)  # headers only: Eigen's own build is not needed
  endif()
  add_library(Eigen3::Eigen INTERFACE IMPORTED GLOBAL)
  target_include_directories(Eigen3::Eigen SYSTEM INTERFACE ${bnorm_eigen_SOURCE_DIR})
endif()

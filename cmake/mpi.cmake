# MPI for bnorm's own programs that run SyncBatchNorm over processes (Debian: libopenmpi-dev and
# openmpi-bin). Not under sanitizers (MPI's own allocations) nor cross-compiled (no mpiexec to
# run them). The library itself never needs MPI: bnorm/mpi.hpp is for its users.
if(NOT BNORM_SANITIZE AND NOT CMAKE_CROSSCOMPILING)
  find_package(MPI COMPONENTS CXX QUIET)
endif()
if(MPI_CXX_FOUND AND MPIEXEC_EXECUTABLE)
  set(BNORM_HAVE_MPI ON)
else()
  set(BNORM_HAVE_MPI OFF)
endif()

# A program of bnorm's over MPI's C interface (its deprecated C++ bindings warn under -Wextra).
function(bnorm_mpi_executable target)
  add_executable(${target} ${ARGN})
  target_link_libraries(${target} PRIVATE bnorm::bnorm MPI::MPI_CXX bnorm_project_flags)
  target_compile_definitions(${target} PRIVATE OMPI_SKIP_MPICXX MPICH_SKIP_MPICXX)
endfunction()

# bnorm_mpi_test(NAME name PROCESSES np COMMAND target args... [PROPERTIES prop value ...]):
# CTest runs `mpiexec -n np target args...`. Open MPI's switches for more processes than cores,
# and for root (as CI runs), are set; other MPIs ignore them.
function(bnorm_mpi_test)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME;PROCESSES" "COMMAND;PROPERTIES")
  list(POP_FRONT arg_COMMAND target)
  add_test(NAME ${arg_NAME} COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG}
    ${arg_PROCESSES} ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${target}> ${MPIEXEC_POSTFLAGS}
    ${arg_COMMAND})
  set_tests_properties(${arg_NAME} PROPERTIES PROCESSORS ${arg_PROCESSES} TIMEOUT 300
    ENVIRONMENT
    "OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
    ${arg_PROPERTIES})
endfunction()

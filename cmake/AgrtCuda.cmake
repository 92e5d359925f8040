# Decides whether the CUDA sources are built and how. Sets AGRT_WITH_CUDA and AGRT_CUDA_ARCHS_STR
# and defines agrt_add_cuda_sources(target sources...).
string(TOUPPER "${AUTOGLM_RT_CUDA}" _agrt_cuda_mode)
if(NOT _agrt_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "AUTOGLM_RT_CUDA must be AUTO, ON or OFF, got '${AUTOGLM_RT_CUDA}'")
endif()

set(AGRT_WITH_CUDA OFF)
set(AGRT_CUDA_ARCHS_STR "")
if(NOT _agrt_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # Respect the user's choice (cache variable or CUDAARCHS); otherwise Ampere and Hopper
    # machine code plus Hopper PTX, which the driver JIT-compiles on anything newer.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
      set(CMAKE_CUDA_ARCHITECTURES "80-real;90-real;90-virtual")
    endif()
    set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(AGRT_WITH_CUDA ON)
    string(REPLACE ";" "," AGRT_CUDA_ARCHS_STR "${CMAKE_CUDA_ARCHITECTURES}")
  elseif(_agrt_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "AUTOGLM_RT_CUDA=ON but no CUDA compiler (nvcc) was found; "
                        "set CUDACXX or use AUTOGLM_RT_CUDA=OFF")
  else()
    message(STATUS "autoglm_rt: nvcc not found, building without CUDA")
  endif()
endif()

function(agrt_add_cuda_sources target)
  target_sources(${target} PRIVATE ${ARGN})
  target_compile_definitions(${target} PUBLIC AGRT_WITH_CUDA=1
                             PRIVATE AGRT_CUDA_ARCHS="${AGRT_CUDA_ARCHS_STR}")
  # CUDA headers stay private: public headers never include them.
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
  set_target_properties(${target} PROPERTIES CUDA_SEPARABLE_COMPILATION OFF
                                             CUDA_RUNTIME_LIBRARY Static)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-fPIC -lineinfo>)
endfunction()

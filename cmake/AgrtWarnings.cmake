# Warnings for our own targets only (never for third-party code). Portable code generation:
# no -march=native; hot loops pick AVX2 at run time through function multiversioning.
function(agrt_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
endfunction()

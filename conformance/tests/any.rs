//! The conformance suite on `AnyBackend`, the run-time choice the RPC server and the binaries
//! use: whatever `VIREO_BACKEND` names (`auto` by default: io-uring where it can start). It
//! checks that the wrapper forwards every part of the backend seam (`flush`, `fresh`, `clock`)
//! and changes nothing the suite can see.

vireo_conformance::conformance_suite!(any, vireo_backends::AnyBackend);

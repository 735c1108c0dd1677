//! The conformance suite on the io_uring backend (skipped with a printed reason where io_uring
//! is unavailable, unless VIREO_REQUIRE_BACKENDS names it).

vireo_conformance::conformance_suite!(io_uring, vireo_backends::IoUring);

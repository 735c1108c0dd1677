//! The conformance suite on the portable backend (the `polling` crate).

vireo_conformance::conformance_suite!(portable, vireo_backends::Portable);

//! The conformance suite on the poll backend.

vireo_conformance::conformance_suite!(poll, vireo_backends::Poll);

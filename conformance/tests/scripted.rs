//! The conformance suite on the scripted backend.

vireo_conformance::conformance_suite!(scripted, vireo_backends::Scripted);

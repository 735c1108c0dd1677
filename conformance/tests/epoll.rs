//! The conformance suite on the epoll backend.

vireo_conformance::conformance_suite!(epoll, vireo_backends::Epoll);

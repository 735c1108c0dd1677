//! libvirt's eventtest cases through the exported C functions, on the epoll backend.

mod eventtest;

#[test]
fn libvirt_eventtest_on_epoll() {
    eventtest::run::<vireo_backends::Epoll>();
}

//! libvirt's eventtest cases through the exported C functions, on the poll backend.

mod eventtest;

#[test]
fn libvirt_eventtest_on_poll() {
    eventtest::run::<vireo_backends::Poll>();
}

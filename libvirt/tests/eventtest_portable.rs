//! libvirt's eventtest cases through the exported C functions, on the portable backend.

mod eventtest;

#[test]
fn libvirt_eventtest_on_portable() {
    eventtest::run::<vireo_backends::Portable>();
}

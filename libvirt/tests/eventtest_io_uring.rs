//! libvirt's eventtest cases through the exported C functions, on the io_uring backend.

mod eventtest;

#[test]
fn libvirt_eventtest_on_io_uring() {
    eventtest::run::<vireo_backends::IoUring>();
}

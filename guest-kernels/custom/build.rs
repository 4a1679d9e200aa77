fn main() {
    shoal_guest_build::link();
}

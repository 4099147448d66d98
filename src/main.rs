fn main() {
    println!("kmsfs");
}

fn main() {
    println!("easel: work in progress");
}

//! With the `cuda` feature, compiles Easel's CUDA kernels to PTX (loaded at run time through
//! candle's custom-kernel cache). Without it there is nothing to build.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        println!("cargo::rerun-if-changed=src/kernels/cuda/easel.cu");
        let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_files(["src/kernels/cuda/easel.cu"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("compiling src/kernels/cuda/easel.cu with nvcc (set CUDA_COMPUTE_CAP when no GPU is present)");
        ptx.write(out_dir.join("ptx.rs")).expect("writing ptx.rs");
    }
}

//! The `fnokern` command line: thin; it parses arguments and calls the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fnokern", version, about = "Train deep Fourier Neural Operators robustly and fast")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the build (CUDA kernels embedded or not, nvcc, targets) and the devices.
    Info,
    /// Check every differentiable op's gradient against central finite differences (f64, CPU).
    Gradcheck {
        /// Only ops whose name contains this text.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => {
            info();
            Ok(())
        }
        Command::Gradcheck { only } => gradcheck(only.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() {
    use fnokern::build_info as b;
    println!("fnokern {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads (rayon)", rayon::current_num_threads());
    if b::KERNELS_EMBEDDED {
        println!("cuda kernels: embedded ({} bytes), nvcc: {}, targets: {}", b::FATBIN.len(), b::NVCC, b::CUDA_TARGETS);
    } else {
        println!("cuda kernels: not embedded (CPU-only build)");
    }
    println!("cuda device: the CUDA backend is not part of this build yet");
}

fn gradcheck(only: Option<&str>) -> fnokern::Result<()> {
    let cases = fnokern::gradcheck::all_cases();
    let mut failed = 0;
    let mut ran = 0;
    for case in cases.iter().filter(|c| only.is_none_or(|o| c.name.contains(o))) {
        ran += 1;
        let report = (case.run)()?;
        let status = if report.passed() { "ok  " } else { "FAIL" };
        println!(
            "{status} {:<34} {:>5} entries  max abs err {:.2e}  max rel err {:.2e}",
            case.name, report.checked, report.max_abs_err, report.max_rel_err
        );
        if !report.passed() {
            failed += 1;
            for m in report.mismatches.iter().take(5) {
                println!("       {m}");
            }
        }
    }
    println!("{} passed, {failed} failed", ran - failed);
    if failed > 0 {
        return Err(fnokern::Error::Autograd(format!("{failed} gradient checks failed")));
    }
    Ok(())
}

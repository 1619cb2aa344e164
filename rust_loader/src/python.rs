//! The thin PyO3 binding layer over the pure-Rust core.
use pyo3::prelude::*;

#[pymodule]
fn _loader(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! The filter itself.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(ReadOneHeader) });
}}

struct ReadOneHeader;

impl Context for ReadOneHeader {}

impl HttpContext for ReadOneHeader {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Read, and keep it observable so the call cannot be optimised away.
        let subject = self.get_http_request_header("x-consumer-username");
        if subject.is_none() {
            proxy_wasm::hostcalls::log(LogLevel::Debug, "noop-filter: no subject").ok();
        }
        Action::Continue
    }
}

//! The probe itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Clone, Default)]
struct Target {
    upstream: String,
    timeout: Duration,
}

#[derive(Default)]
struct Root {
    target: Target,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&config);
        let mut words = text.split_whitespace();
        let (Some(upstream), Some(Ok(ms))) = (words.next(), words.next().map(str::parse::<u64>)) else {
            return false;
        };
        self.target = Target { upstream: upstream.to_owned(), timeout: Duration::from_millis(ms) };
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe { target: self.target.clone(), sent_ms: 0 }))
    }
}

struct Probe {
    target: Target,
    sent_ms: u128,
}

fn millis(time: SystemTime) -> u128 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

impl Context for Probe {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let elapsed = millis(self.get_current_time()).saturating_sub(self.sent_ms).to_string();
        let status = self
            .get_http_call_response_header(":dispatch_status")
            .or_else(|| self.get_http_call_response_header(":status"))
            .unwrap_or_default();
        self.send_http_response(
            200,
            vec![("x-probe-elapsed-ms", elapsed.as_str()), ("x-probe-dispatch-status", status.as_str())],
            None,
        );
    }
}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.sent_ms = millis(self.get_current_time());
        let headers = vec![(":method", "GET"), (":path", "/"), (":authority", "probe")];
        match self.dispatch_http_call(&self.target.upstream, headers, None, vec![], self.target.timeout) {
            Ok(_) => Action::Pause,
            Err(_) => {
                self.send_http_response(500, vec![("x-probe-dispatch-status", "refused")], None);
                Action::Pause
            }
        }
    }
}

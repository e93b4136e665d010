// See json.hpp.
#include "json.hpp"

#include <charconv>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace sencache::json {

namespace {

constexpr int kMaxDepth = 512;

struct Parser {
    const char* p;
    const char* end;
    const char* begin;

    [[noreturn]] void fault(const std::string& what) const {
        throw std::runtime_error(what + " at byte " + std::to_string(p - begin));
    }

    void space() {
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
    }

    bool literal(const char* word) {
        const size_t n = std::char_traits<char>::length(word);
        if (static_cast<size_t>(end - p) >= n && std::char_traits<char>::compare(p, word, n) == 0) {
            p += n;
            return true;
        }
        return false;
    }

    static void utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    unsigned hex4() {
        if (end - p < 4) fault("truncated \\u escape");
        unsigned v = 0;
        for (int i = 0; i < 4; ++i, ++p) {
            const char c = *p;
            v <<= 4;
            if (c >= '0' && c <= '9') v |= c - '0';
            else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
            else fault("bad \\u escape");
        }
        return v;
    }

    std::string string() {
        ++p;  // opening quote
        std::string out;
        while (true) {
            if (p >= end) fault("unterminated string");
            const char c = *p++;
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) fault("control character in string");
            if (c != '\\') {
                out += c;
                continue;
            }
            if (p >= end) fault("unterminated string");
            const char e = *p++;
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                        const char* save = p;
                        p += 2;
                        const unsigned low = hex4();
                        if (low >= 0xDC00 && low < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                        else p = save;
                    }
                    utf8(out, cp);
                    break;
                }
                default: fault("bad escape");
            }
        }
    }

    double number() {
        const char* start = p;
        if (p < end && *p == '-') ++p;
        if (literal("Infinity")) return *start == '-' ? -std::numeric_limits<double>::infinity()
                                                       : std::numeric_limits<double>::infinity();
        if (p >= end || !(*p >= '0' && *p <= '9')) fault("bad number");
        if (*p == '0') ++p;
        else while (p < end && *p >= '0' && *p <= '9') ++p;
        if (p < end && *p == '.') {
            ++p;
            if (p >= end || !(*p >= '0' && *p <= '9')) fault("bad number");
            while (p < end && *p >= '0' && *p <= '9') ++p;
        }
        if (p < end && (*p == 'e' || *p == 'E')) {
            ++p;
            if (p < end && (*p == '+' || *p == '-')) ++p;
            if (p >= end || !(*p >= '0' && *p <= '9')) fault("bad number");
            while (p < end && *p >= '0' && *p <= '9') ++p;
        }
        double value = 0.0;
        const char* digits = *start == '-' ? start + 1 : start;
        auto [ptr, ec] = std::from_chars(digits, p, value);
        if (ptr != p) fault("bad number");
        if (ec == std::errc::result_out_of_range) {
            // Python's float() gives infinity on overflow and zero on underflow: tell them apart
            // by the sign of the exponent.
            bool tiny = false;
            for (const char* q = digits; q + 1 < p; ++q)
                if ((*q == 'e' || *q == 'E') && q[1] == '-') tiny = true;
            value = tiny ? 0.0 : std::numeric_limits<double>::infinity();
        }
        return *start == '-' ? -value : value;
    }

    Value value(int depth) {
        if (depth > kMaxDepth) fault("nesting too deep");
        space();
        if (p >= end) fault("unexpected end");
        Value v;
        const char c = *p;
        if (c == '{') {
            ++p;
            v.kind = Value::Object;
            space();
            if (p < end && *p == '}') { ++p; return v; }
            while (true) {
                space();
                if (p >= end || *p != '"') fault("expected a key");
                std::string key = string();
                space();
                if (p >= end || *p != ':') fault("expected ':'");
                ++p;
                v.members[key] = value(depth + 1);
                space();
                if (p < end && *p == ',') { ++p; continue; }
                if (p < end && *p == '}') { ++p; return v; }
                fault("expected ',' or '}'");
            }
        }
        if (c == '[') {
            ++p;
            v.kind = Value::Array;
            space();
            if (p < end && *p == ']') { ++p; return v; }
            while (true) {
                v.items.push_back(value(depth + 1));
                space();
                if (p < end && *p == ',') { ++p; continue; }
                if (p < end && *p == ']') { ++p; return v; }
                fault("expected ',' or ']'");
            }
        }
        if (c == '"') { v.kind = Value::String; v.text = string(); return v; }
        if (literal("true")) { v.kind = Value::Bool; v.boolean = true; return v; }
        if (literal("false")) { v.kind = Value::Bool; return v; }
        if (literal("null")) return v;
        if (literal("NaN")) { v.kind = Value::Number; v.number = std::numeric_limits<double>::quiet_NaN(); return v; }
        v.kind = Value::Number;
        v.number = number();
        return v;
    }
};

}  // namespace

Value parse(const char* data, size_t size) {
    // json.loads on bytes accepts a UTF-8 byte order mark.
    const bool bom = size >= 3 && static_cast<unsigned char>(data[0]) == 0xEF &&
                     static_cast<unsigned char>(data[1]) == 0xBB && static_cast<unsigned char>(data[2]) == 0xBF;
    Parser parser{data + (bom ? 3 : 0), data + size, data};
    Value v = parser.value(0);
    parser.space();
    if (parser.p != parser.end) parser.fault("extra data");
    return v;
}

}  // namespace sencache::json

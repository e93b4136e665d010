// A small JSON reader (RFC 8259 plus Python's NaN/Infinity tokens, as json.loads accepts), for
// sensitivity.json and manifest.json. Numbers parse with std::from_chars: correctly rounded and
// independent of the C locale, like Python's float().
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace sencache::json {

struct Value {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool boolean = false;
    double number = 0.0;
    std::string text;
    std::vector<Value> items;
    std::map<std::string, Value> members;  // duplicate keys: the last wins, as in Python

    const Value* find(const std::string& key) const {
        auto it = members.find(key);
        return it == members.end() ? nullptr : &it->second;
    }
};

// Parse a whole document; throws std::runtime_error with the offset of the fault.
Value parse(const char* data, size_t size);

}  // namespace sencache::json

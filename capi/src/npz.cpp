// See npz.hpp.
#include "npz.hpp"

#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "common.hpp"

namespace sencache::npz {

namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& what) {
    throw Error(SC_ERR_CORRUPT, "cannot read " + path + " as .npz: " + what);
}

uint64_t le(const unsigned char* p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

struct Entry {
    std::string name;
    uint16_t method;
    uint32_t crc;
    uint64_t compressed, size, offset;
};

std::vector<Entry> directory(const std::string& path, const std::vector<unsigned char>& z) {
    // End of central directory: the last "PK\5\6" within the final 64 KiB + 22 bytes.
    if (z.size() < 22) corrupt(path, "too short for a zip file");
    size_t eocd = std::string::npos;
    const size_t lowest = z.size() > 65557 ? z.size() - 65557 : 0;
    for (size_t i = z.size() - 22 + 1; i-- > lowest;) {
        if (le(&z[i], 4) == 0x06054b50) { eocd = i; break; }
    }
    if (eocd == std::string::npos) corrupt(path, "no zip end-of-directory record");
    uint64_t entries = le(&z[eocd + 10], 2);
    uint64_t dir_size = le(&z[eocd + 12], 4);
    uint64_t dir_offset = le(&z[eocd + 16], 4);
    if (entries == 0xFFFF || dir_offset == 0xFFFFFFFFu || dir_size == 0xFFFFFFFFu) {
        // Zip64: the locator sits just before the record and points at the zip64 record.
        if (eocd < 20 || le(&z[eocd - 20], 4) != 0x07064b50) corrupt(path, "no zip64 locator");
        const uint64_t at = le(&z[eocd - 20 + 8], 8);
        if (at > z.size() - 56 || le(&z[at], 4) != 0x06064b50) corrupt(path, "bad zip64 record");
        entries = le(&z[at + 32], 8);
        dir_size = le(&z[at + 40], 8);
        dir_offset = le(&z[at + 48], 8);
    }
    if (dir_offset > z.size() || dir_size > z.size() - dir_offset) corrupt(path, "directory out of bounds");
    std::vector<Entry> out;
    size_t p = dir_offset;
    const size_t dir_end = dir_offset + dir_size;
    for (uint64_t k = 0; k < entries; ++k) {
        if (p + 46 > dir_end || le(&z[p], 4) != 0x02014b50) corrupt(path, "bad directory entry");
        Entry e;
        e.method = static_cast<uint16_t>(le(&z[p + 10], 2));
        e.crc = static_cast<uint32_t>(le(&z[p + 16], 4));
        e.compressed = le(&z[p + 20], 4);
        e.size = le(&z[p + 24], 4);
        const size_t name_len = le(&z[p + 28], 2), extra_len = le(&z[p + 30], 2), comment_len = le(&z[p + 32], 2);
        e.offset = le(&z[p + 42], 4);
        if (p + 46 + name_len + extra_len + comment_len > dir_end) corrupt(path, "bad directory entry");
        e.name.assign(reinterpret_cast<const char*>(&z[p + 46]), name_len);
        // Zip64 extra field: the 8-byte values of the fields that are 0xFFFFFFFF, in this order.
        size_t x = p + 46 + name_len;
        const size_t x_end = x + extra_len;
        while (x + 4 <= x_end) {
            const uint16_t id = static_cast<uint16_t>(le(&z[x], 2));
            const size_t len = le(&z[x + 2], 2);
            if (x + 4 + len > x_end) corrupt(path, "bad extra field");
            if (id == 0x0001) {
                size_t q = x + 4;
                for (uint64_t* field : {&e.size, &e.compressed, &e.offset}) {
                    if (*field != 0xFFFFFFFFu) continue;
                    if (q + 8 > x + 4 + len) corrupt(path, "bad zip64 field");
                    *field = le(&z[q], 8);
                    q += 8;
                }
            }
            x += 4 + len;
        }
        out.push_back(e);
        p += 46 + name_len + extra_len + comment_len;
    }
    return out;
}

std::vector<unsigned char> contents(const std::string& path, const std::vector<unsigned char>& z, const Entry& e) {
    if (e.offset > z.size() - 30 || le(&z[e.offset], 4) != 0x04034b50) corrupt(path, "bad local header of " + e.name);
    const uint64_t start = e.offset + 30 + le(&z[e.offset + 26], 2) + le(&z[e.offset + 28], 2);
    if (start > z.size() || e.compressed > z.size() - start) corrupt(path, e.name + " is truncated");
    if (e.size > (uint64_t{1} << 32)) corrupt(path, e.name + " is too large for a table");
    std::vector<unsigned char> out(e.size);
    if (e.method == 0) {
        if (e.compressed != e.size) corrupt(path, e.name + ": stored sizes differ");
        if (e.size) std::memcpy(out.data(), &z[start], e.size);
    } else if (e.method == 8) {
        z_stream s{};
        if (inflateInit2(&s, -MAX_WBITS) != Z_OK) throw Error(SC_ERR_INTERNAL, "zlib: inflateInit2 failed");
        s.next_in = const_cast<unsigned char*>(&z[start]);
        s.avail_in = static_cast<uInt>(e.compressed);
        unsigned char dummy = 0;
        s.next_out = e.size ? out.data() : &dummy;
        s.avail_out = static_cast<uInt>(e.size);
        const int rc = inflate(&s, Z_FINISH);
        const uint64_t produced = s.total_out;
        inflateEnd(&s);
        if (rc != Z_STREAM_END || produced != e.size) corrupt(path, e.name + ": deflate stream is damaged");
    } else {
        corrupt(path, e.name + ": compression method " + std::to_string(e.method) + " (only stored and deflate)");
    }
    if (crc32(0L, out.data(), static_cast<uInt>(out.size())) != e.crc) corrupt(path, e.name + ": CRC mismatch");
    return out;
}

// The value of 'key' in the .npy header dict, as its source text (up to the next top-level comma).
std::string field(const std::string& header, const std::string& key) {
    const size_t at = header.find("'" + key + "'");
    if (at == std::string::npos) return "";
    size_t p = header.find(':', at);
    if (p == std::string::npos) return "";
    ++p;
    int depth = 0;
    std::string out;
    for (; p < header.size(); ++p) {
        const char c = header[p];
        if (c == '(' || c == '[') ++depth;
        if (c == ')' || c == ']') --depth;
        if ((c == ',' || c == '}') && depth == 0) break;
        if (c != ' ') out += c;
    }
    return out;
}

Array npy(const std::string& path, const std::string& name, const std::vector<unsigned char>& b) {
    const auto bad = [&](const std::string& what) { corrupt(path, name + ": " + what); };
    if (b.size() < 10 || std::memcmp(b.data(), "\x93NUMPY", 6) != 0) bad("not a .npy member");
    const int major = b[6];
    size_t header_len, at;
    if (major == 1) { header_len = le(&b[8], 2); at = 10; }
    else if (major == 2 || major == 3) {
        if (b.size() < 12) bad("truncated header");
        header_len = le(&b[8], 4);
        at = 12;
    } else bad("unknown .npy version " + std::to_string(major));
    if (header_len > b.size() - at) bad("truncated header");
    const std::string header(reinterpret_cast<const char*>(&b[at]), header_len);
    const std::string descr = field(header, "descr"), order = field(header, "fortran_order"),
                      shape_text = field(header, "shape");
    if (descr.size() < 5 || descr.front() != '\'' || descr.back() != '\'') bad("no dtype");
    const char endian = descr[1], kind = descr[2];
    const int width = std::atoi(descr.substr(3, descr.size() - 4).c_str());
    Array a;
    // shape: "(n,)", "()", "(a,b)".
    if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')') bad("no shape");
    size_t count = 1;
    std::string digits;
    for (size_t i = 1; i < shape_text.size(); ++i) {
        const char c = shape_text[i];
        if (c >= '0' && c <= '9') digits += c;
        else if (c == ',' || c == ')') {
            if (!digits.empty()) {
                if (digits.size() > 12) bad("shape too large");
                a.shape.push_back(std::stoll(digits));
                count *= static_cast<size_t>(a.shape.back());
                digits.clear();
            }
        } else bad("bad shape");
    }
    const bool known = (kind == 'f' && (width == 2 || width == 4 || width == 8)) ||
                       ((kind == 'i' || kind == 'u') && (width == 1 || width == 2 || width == 4 || width == 8));
    if (!known) bad("dtype " + descr + " is not a float or integer array");
    if (width > 1 && endian != '<' && endian != '>' && endian != '=') bad("dtype " + descr + " has no byte order");
    if (order != "False" && order != "True") bad("no fortran_order");
    const size_t data = at + header_len;
    if (count > (b.size() - data) / width || count * width != b.size() - data) bad("data size does not match its shape");
    a.values.resize(count);
    for (size_t i = 0; i < count; ++i) {
        unsigned char v[8];
        std::memcpy(v, &b[data + i * width], width);
        if (endian == '>') std::reverse(v, v + width);
        if (kind == 'f' && width == 8) { double d; std::memcpy(&d, v, 8); a.values[i] = d; }
        else if (kind == 'f' && width == 4) { float f; std::memcpy(&f, v, 4); a.values[i] = f; }
        else if (kind == 'f') {
            // IEEE half to double, exactly.
            const unsigned h = v[0] | (v[1] << 8);
            const int exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
            double m = exp == 0 ? std::ldexp(mant, -24)
                     : exp == 31 ? (mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity())
                     : std::ldexp(1024 + mant, exp - 25);
            a.values[i] = (h & 0x8000) ? -m : m;
        } else {
            const uint64_t raw = le(v, width);
            if (kind == 'u') a.values[i] = static_cast<double>(raw);
            else {
                const int shift = 64 - 8 * width;
                a.values[i] = static_cast<double>(static_cast<int64_t>(raw << shift) >> shift);
            }
        }
    }
    return a;
}

}  // namespace

std::map<std::string, Array> load(const std::string& path, const std::set<std::string>& keys) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(SC_ERR_NOT_FOUND, "no such file: " + path);
    std::vector<unsigned char> z((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (f.bad()) throw Error(SC_ERR_CORRUPT, "cannot read " + path);
    std::map<std::string, Array> out;
    for (const Entry& e : directory(path, z)) {
        std::string key = e.name;
        if (key.size() > 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
        if (keys.count(key) == 0) continue;  // np.load reads a member only when asked for it
        out[key] = npy(path, e.name, contents(path, z, e));
    }
    return out;
}

}  // namespace sencache::npz
